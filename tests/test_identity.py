"""The harness scores exactly as lm-eval's own ``hf`` model does: the untrained base model
(the same checkpoint folder) and a trained LoRA run (its adapter loaded by peft inside
lm-eval: ``peft=<folder>``), on the same task YAMLs, task by task, every task metric."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_STUDY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def _slice(path: Path, tasks: tuple[str, ...], per_task: int) -> list[dict]:
    seen: dict[str, int] = {}
    out = []
    for line in path.read_text().splitlines():
        item = json.loads(line)
        if item["task"] in tasks and seen.get(item["task"], 0) < per_task:
            seen[item["task"]] = seen.get(item["task"], 0) + 1
            out.append(item)
    return out


def test_base_and_lora_scores_equal_lm_eval_hf_model_on_every_task_and_metric(tmp_path, monkeypatch, capsys):
    from harness.cli.main import main

    # real multiple-choice items with multi-token answers of different lengths (acc_norm differs)
    tasks = ("arc_easy", "winogrande", "commonsense_qa")
    train = _slice(ROOT / "data" / "commonsense" / "train.jsonl", tasks, 6)
    test = _slice(ROOT / "data" / "commonsense" / "test.jsonl", tasks, 12)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(i) + "\n" for i in train))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(i) + "\n" for i in test))
    config = {
        "study": "identity",
        "out_dir": "out",
        "model": {**TINY_STUDY_MODEL, "tiny": {**TINY_STUDY_MODEL["tiny"], "vocab_size": 2048}},
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": ["lora"],
        "data": {"source": "jsonl", "train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
        "train": {"seeds": [0], "steps": 6, "batch_size": 4, "max_length": "auto", "lr": 0.05},
        "eval": {"batch_size": 8},
    }
    path = tmp_path / "identity.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    from harness.plan.study import plan_from_file

    _, plan = plan_from_file(str(path))
    (base,) = [r for r in plan.runs if r.is_base]
    lora = next(r for r in plan.trained_runs if r.tag == "r4")
    assert main(["data", "--config", str(path)]) == 0
    assert main(["evaluate", "--config", str(path), "--run", base.run_id, "--quiet"]) == 0
    assert main(["train", "--config", str(path), "--run", lora.run_id, "--quiet"]) == 0
    capsys.readouterr()

    assert main(["identity", "--config", str(path), "--run", lora.run_id]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "lm_eval_identity.json").read_text())
    assert report["runs"] == [base.run_id, lora.run_id]
    # acc and acc_norm everywhere; the Brier score where every test item of the task has the
    # same number of choices (lm-eval could not aggregate it otherwise)
    uniform = [t for t in tasks if len({len(i["choices"]) for i in test if i["task"] == t}) == 1]
    assert "winogrande" in uniform and "commonsense_qa" in uniform
    metrics = {("base model", t, m) for t in tasks for m in ("acc", "acc_norm")}
    metrics |= {("base model", t, "brier_score") for t in uniform}
    expected = metrics | {("LoRA (peft adapter)", t, m) for _, t, m in metrics}
    assert {(r["model"], r["task"], r["metric"]) for r in report["rows"]} == expected
    for run_id in report["runs"]:
        scores = json.loads((tmp_path / "out" / "runs" / run_id / "metrics.json").read_text())["tasks"]
        for row in (r for r in report["rows"] if r["run"] == run_id):
            assert row["harness"] == scores[row["task"]][row["metric"]]
            if row["metric"] == "brier_score":
                # a continuous function of the float32 log-likelihoods, which the two models
                # compute in another order (cached lower layers, logits at the scored positions
                # only; peft adds its LoRA term in its own order): equal to ~1e-6, not the bit
                assert abs(row["difference"]) < 1e-5, row
            else:  # every accuracy: exactly the same choices
                assert row["difference"] == 0, row
    assert report["max_abs_difference"] < 1e-5
    # the LoRA run really moved the scores away from the untrained model's (so the check is
    # not two copies of the base model): its log-likelihoods differ, visible in the Brier score
    by = {(r["model"], r["task"], r["metric"]): r["harness"] for r in report["rows"]}
    assert any(by[("base model", t, "brier_score")] != by[("LoRA (peft adapter)", t, "brier_score")]
               for t in uniform)
    # the accuracies are fractions of the 12 test items of each task
    assert all(abs(r["lm_eval_hf"] * 12 - round(r["lm_eval_hf"] * 12)) < 1e-9
               for r in report["rows"] if r["metric"] != "brier_score")
    assert "| model | task | metric | harness | lm-eval hf | difference |" in out

    # a fresh clone on another CPU: the weights were restored, not bit-identically, so the
    # stored scores belong to other weights; the check scores the weights that are here
    # (stored scores stood in for here by scores of another model) and says so
    run_dir = tmp_path / "out" / "runs" / lora.run_id
    metrics_path = run_dir / "metrics.json"
    stored = json.loads(metrics_path.read_text())
    for task in stored["tasks"].values():
        task["acc"] = 1.0 - task["acc"]
    metrics_path.chmod(0o644)
    metrics_path.write_text(json.dumps(stored))
    (run_dir / "restore.json").write_text(json.dumps(
        {"run_id": lora.run_id, "restored": True, "identical_losses": False, "max_abs_loss_diff": 0.25,
         "steps_compared": 6}))
    assert main(["identity", "--config", str(path), "--run", lora.run_id]) == 0
    again = json.loads((tmp_path / "out" / "lm_eval_identity.json").read_text())
    assert again["max_abs_difference"] < 1e-5
    assert again["harness_side"].startswith(f"the restored weights of {lora.run_id} scored again")
    assert "largest |loss difference| 0.2500 over 6 steps" in again["harness_side"]
    assert [r["harness"] for r in again["rows"]] == pytest.approx([r["harness"] for r in report["rows"]], abs=1e-6)
    assert json.loads(metrics_path.read_text()) == stored  # nothing written to the run
    assert report["harness_side"] == "stored metrics.json"
