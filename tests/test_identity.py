"""The harness scores the base model exactly as lm-eval's own ``hf`` model does (issue 18):
the same task YAMLs, the same checkpoint folder, every task's ``acc`` and ``acc_norm``."""

from __future__ import annotations

import json
from pathlib import Path

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


def test_base_scores_equal_lm_eval_hf_model_on_every_task_and_metric(tmp_path, monkeypatch, capsys):
    from harness.cli import main

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
        "train": {"seeds": [0], "steps": 2, "batch_size": 4, "max_length": "auto"},
        "eval": {"batch_size": 8},
    }
    path = tmp_path / "identity.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    from harness.study import plan_from_file

    _, plan = plan_from_file(str(path))
    (base,) = [r for r in plan.runs if r.is_base]
    assert main(["data", "--config", str(path)]) == 0
    assert main(["evaluate", "--config", str(path), "--run", base.run_id, "--quiet"]) == 0
    capsys.readouterr()

    assert main(["identity", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "lm_eval_identity.json").read_text())
    assert {(r["task"], r["metric"]) for r in report["rows"]} == {
        (t, m) for t in tasks for m in ("acc", "acc_norm")
    }
    harness_scores = json.loads((tmp_path / "out" / "runs" / base.run_id / "metrics.json").read_text())["tasks"]
    for row in report["rows"]:
        assert row["harness"] == harness_scores[row["task"]][row["metric"]]
        assert abs(row["difference"]) < 1e-12, row
    assert report["max_abs_difference"] < 1e-12
    # the scores are fractions of the 12 test items of each task
    assert all(abs(r["lm_eval_hf"] * 12 - round(r["lm_eval_hf"] * 12)) < 1e-9 for r in report["rows"])
    assert "| task | metric | harness | lm-eval hf | difference |" in out
