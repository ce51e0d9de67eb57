"""End to end: the smoke config through Snakemake in a temporary folder — every built-in
method and the three example plugins (a router-only block mixture, a method with its own
layer and budget solver, a staged method) — then the lm-eval model class checked on its run
folders (command-line reproduction, for a plugin too; lower-layer cache exactness;
tokenisation shared by training and evaluation)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
RUN_FILES = ("run.json", "train.json", "train_log.jsonl", "metrics.json", "lm_eval_results.json")
TABLES = ("main_table", "budget_table", "significance")
#: built-ins of config/smoke.yaml whose jobs repeat a kept method's (see the smoke fixture)
SKIPPED_HERE = ("multilora", "malora", "loramoe", "mode")
FIGURES = ("granularity", "params_vs_acc", "task_heatmap", "expert_load", "training_curves")


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        # the example plugins are imported by module path (examples.*), as a user's would be
        "PYTHONPATH": str(ROOT),
        # the jobs Snakemake starts call `python`: the interpreter running the tests
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def _snakemake(args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-s",
            str(ROOT / "Snakefile"),
            "--directory",
            str(cwd),
            *args,
        ],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=1200,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The smoke study, run once for this module: ``(folder, config, plan)``."""
    from harness.plan.config import load_config
    from harness.plan.study import plan_study

    folder = tmp_path_factory.mktemp("smoke")
    config = yaml.safe_load((ROOT / "config" / "smoke.yaml").read_text())
    config["out_dir"] = "out"
    config["eval"]["general_text"] = str(ROOT / config["eval"]["general_text"])
    # every job is a Python start of seconds: the DAG here keeps one method of each path
    # through it (reference, top-k, soft, bias-routed, staged, per-layer experts, shared A,
    # each plugin kind) and leaves out those whose jobs are the same as a kept one's
    # (SKIPPED_HERE; each is trained on every path by tests/test_distributed.py and
    # test_methods.py, and the whole config/smoke.yaml is what `snakemake --configfile
    # config/smoke.yaml` runs)
    config["methods"] = [m for m in config["methods"] if m not in SKIPPED_HERE]
    path = folder / "smoke.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    result = _snakemake(["--cores", "2", "--configfile", str(path)], folder)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        plan = plan_study(load_config(path))
    finally:
        os.chdir(cwd)
    return folder, path, plan


def test_every_expected_file_exists_and_the_table_has_one_finite_score_per_run(smoke):
    folder, _, plan = smoke
    out = folder / "out"
    assert (out / "data" / "train.jsonl").stat().st_size > 0
    for run in plan.runs:
        run_dir = out / "runs" / run.run_id
        expected = (
            ("run.json", "metrics.json", "lm_eval_results.json") if run.is_base else RUN_FILES
        )
        for name in expected:
            assert (run_dir / name).stat().st_size > 0, f"{run.run_id}/{name}"
        if not run.is_base:
            assert any((run_dir / "adapter").iterdir())
            assert not (run_dir / "checkpoints").exists()

    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["run_id"]) == sorted(r.run_id for r in plan.runs)
    assert all(math.isfinite(v) and 0 <= v <= 1 for v in summary["suite_acc"])
    # MoA (two stages) is in the study, with its router accuracy beside the score
    (router_accuracy,) = summary.loc[summary["method"] == "moa", "router_accuracy"]
    assert 0 <= router_accuracy <= 1
    # every example plugin ran through the DAG and reached the summary
    assert {"frozen_router", "gated_lora", "lorahub", "adamole"} <= set(summary["method"])
    assert {"hydralora", "mola"} <= set(summary["method"])
    n_tasks = len(plan.config["data"]["tasks"])
    for run in plan.runs:
        metrics = json.loads((out / "runs" / run.run_id / "metrics.json").read_text())
        row = summary[summary["run_id"] == run.run_id].iloc[0]
        assert row["suite_acc"] == pytest.approx(metrics["suite_acc"])
        tasks = metrics["tasks"]
        assert len(tasks) == n_tasks
        assert metrics["suite_acc"] == pytest.approx(sum(t["score"] for t in tasks.values()) / n_tasks)
        for task, value in tasks.items():  # the summary holds the primary score and lm-eval's own
            assert value["score"] == value[value["primary"]]
            assert row[f"score_{task}"] == pytest.approx(value["score"])
            assert row[f"acc_{task}"] == pytest.approx(value["acc"])
            assert row[f"acc_norm_{task}"] == pytest.approx(value["acc_norm"])
            assert row[f"acc_stderr_{task}"] == pytest.approx(value["acc_stderr"])
        routed = run.method in (
            "molora", "sira", "smora", "malora", "moa", "frozen_router", "hydralora", "adamole",
            "loramoe", "mode", "mola", "gated_lora",
        )
        if routed:  # which experts each task used, recorded while lm-eval scored
            routing = json.loads((out / "runs" / run.run_id / "routing.json").read_text())
            assert sorted(routing["sequences"]) == sorted(plan.config["data"]["tasks"])
            # MoDE has about 2G experts a module, MoLA's top layers about 1.6G (methods/mode.py, mola.py)
            bound = {"mode": 2 * run.granularity, "mola": 2 * run.granularity}.get(run.method, run.granularity)
            assert 1 <= metrics["effective_experts"] <= bound + 1e-6
        else:
            assert not (out / "runs" / run.run_id / "routing.json").exists()
            assert metrics["effective_experts"] is None
    # MoA and LoraHub ask for the same task LoRAs: one folder per task, trained once
    assert sorted(p.name.split("-")[0] for p in (out / "task_adapters").iterdir()) == sorted(
        plan.config["data"]["tasks"]
    )

    for table in TABLES:
        for ext in ("csv", "md", "tex"):
            assert (out / "tables" / f"{table}.{ext}").stat().st_size > 0
    for figure in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / "figures" / f"{figure}.{ext}").stat().st_size > 1000


def test_one_registry_entry_a_forgetting_and_a_cost_column_reach_summary_and_main_table(smoke):
    """The Brier score is one entry of the metric registry (harness.common.metrics): the task
    YAMLs list it, evaluation stores it per task and per item, and the summary and the main
    table show it. The general text's word perplexity gives every run's forgetting; training
    records its measured cost. A plugin's metric is shown in its declared unit."""
    folder, _, plan = smoke
    out = folder / "out"
    summary = pd.read_csv(out / "summary.csv")
    for run in plan.runs:
        metrics = json.loads((out / "runs" / run.run_id / "metrics.json").read_text())
        row = summary[summary["run_id"] == run.run_id].iloc[0]
        briers = []
        for task, value in metrics["tasks"].items():
            per_item = metrics["items"][task]["brier_score"]
            assert value["brier_score"] == pytest.approx(sum(per_item) / len(per_item), rel=1e-5)
            assert 0 <= value["brier_score"] <= 2
            assert row[f"brier_score_{task}"] == pytest.approx(value["brier_score"])
            briers.append(value["brier_score"])
        assert row["suite_brier_score"] == pytest.approx(sum(briers) / len(briers))
        general = metrics["general_text"]
        assert general["word_perplexity"] > 1 and len(general["items"]["words"]) == 5  # 5 articles
        assert row["general_word_ppl"] == pytest.approx(general["word_perplexity"])
        if run.is_base:
            assert row["forgetting"] == 0
            continue
        train = json.loads((out / "runs" / run.run_id / "train.json").read_text())
        cost = train["cost"]
        assert cost["tokens_per_s"] > 0 and cost["peak_rss_mib"] > 100
        adapter = out / "runs" / run.run_id / "adapter" / "adapter.safetensors"
        assert cost["adapter_bytes"] == adapter.stat().st_size
        assert row["tokens_per_s"] == pytest.approx(cost["tokens_per_s"])
        assert train["settings"]["steps"] == len(list((out / "runs" / run.run_id / "train_log.jsonl").open()))
    base_ppl = summary.loc[summary["method"] == "base", "general_word_ppl"].iloc[0]
    trained = summary[summary["method"] != "base"]
    assert list(trained["forgetting"]) == pytest.approx(list(trained["general_word_ppl"] / base_ppl - 1))

    main = (out / "tables" / "main_table.md").read_text()
    header = next(line for line in main.splitlines() if line.startswith("| method"))
    for column in ("suite Brier score ↓", "forgetting (%)", "tokens/s", "peak RSS (MiB)",
                   "adapter (KiB)", "experts/token", "router accuracy"):
        assert column in header, column
    # the plugin's experts per token is a count (1 to G), not a share multiplied by 100
    table = pd.read_csv(out / "tables" / "main_table.csv")
    active = table.loc[table["method"] == "adamole", "metric:active_experts"]
    assert len(active) == 2 and all(1 <= v <= g for v, g in zip(active, (3, 6)))
    assert "metric:active_experts" in table and (table["metric:router_accuracy"].dropna() > 1).all()
    budget = (out / "tables" / "budget_table.md").read_text()
    assert "adaptive: 1 to 6 experts a token (threshold router)" in budget
    for name in ("forgetting", "cost"):
        assert (out / "tables" / f"{name}.md").read_text().startswith("Study smoke")
    assert (out / "figures" / "cost.png").stat().st_size > 1000


def test_the_tune_stage_chose_each_rate_on_the_validation_split_and_the_final_runs_trained_at_it(smoke):
    """Issue 26.4: tuning runs train on the training items minus the validation split and are
    scored on that split; the choice is the best mean; tuned final runs train at it, the
    others at the rate planned for them (``train.lr`` unless their method sets its own)."""
    from harness.data.validation import validation_split
    from harness.plan.study import row_key
    from harness.run.tune import choose

    folder, _, plan = smoke
    out = folder / "out"
    tune = plan.config["tune"]
    items = [json.loads(line) for line in (out / "data" / "train.jsonl").open()]
    kept, held = validation_split(items, tune["validation_fraction"], tune["seed"])
    rates = json.loads((out / "tuning" / "rates.json").read_text())["rates"]
    assert set(rates) == {row_key(r.method, r.tag) for r in plan.runs if r.tuned} == {"lora-r6", "lora-r2"}
    scores: dict = {}
    for run in plan.tuning:
        trained = json.loads((out / run.path / "train.json").read_text())
        scored = json.loads((out / run.path / "metrics.json").read_text())
        assert trained["settings"]["lr"] in tune["lrs"] and run.seed not in plan.config["train"]["seeds"]
        assert trained["examples"] == len(kept) and sum(len(v["acc"]) for v in scored["items"].values()) == len(held)
        scores.setdefault(row_key(run.method, run.tag), {}).setdefault(trained["settings"]["lr"], []).append(
            scored["suite_acc"])
    assert len(plan.tuning) == 2 * len(tune["lrs"])
    for key, by_rate in scores.items():
        assert rates[key]["lr"] == choose(by_rate)
    for run in plan.trained_runs:  # an untuned run at its planned rate (train.lr, or its method's own)
        lr = json.loads((out / "runs" / run.run_id / "train.json").read_text())["settings"]["lr"]
        assert lr == (rates[row_key(run.method, run.tag)]["lr"] if run.tuned else run.settings.lr), run.run_id
        assert run.tuned or run.settings.lr is not None
    assert [r.settings.lr for r in plan.trained_runs if r.method == "sira"] == [plan.config["train"]["lr"]] * 2


def test_training_logs_hold_loss_aux_loss_expert_load_and_step_time(smoke):
    folder, _, plan = smoke
    config = plan.config
    for run in plan.trained_runs:
        records = [
            json.loads(line)
            for line in (folder / "out" / "runs" / run.run_id / "train_log.jsonl").open()
        ]
        assert [r["step"] for r in records] == list(range(len(records)))
        assert all(math.isfinite(r["loss"]) and r["step_time"] > 0 for r in records)
        if run.method in ("sira", "smora", "molora"):
            loads = [r["expert_load"] for r in records if r.get("expert_load")]
            assert loads, run.run_id
            for per_layer in loads[0].values():
                assert len(per_layer) == run.granularity
                assert sum(per_layer) == pytest.approx(1.0, abs=1e-4)
        if run.method == "sira":
            assert all(r["aux_loss"] is not None for r in records)
        # MoA's stage two trains its router for its own share of the steps
        expected = config["train"]["steps"]
        if run.method == "moa":
            expected = run.method_config["router_steps"]
        elif run.method == "lorahub":  # its weights train for 1/T of the steps
            expected = math.ceil(expected / run.granularity)
        assert len(records) == expected, run.run_id


def test_an_unchanged_rerun_does_no_work(smoke):
    folder, path, _ = smoke
    dry = _snakemake(["-n", "--cores", "2", "--configfile", str(path)], folder)
    assert dry.returncode == 0
    assert "Nothing to be done" in dry.stdout + dry.stderr


@pytest.mark.parametrize("method", ["smora", "frozen_router"])
def test_lm_eval_command_line_reproduces_the_stored_score(smoke, tmp_path, method):
    """lm-eval's own command line on a run folder (a plugin's too: run.json names the plugins
    its method needs, and the model class loads them) gives every stored score exactly."""
    folder, _, plan = smoke
    run = next(r for r in plan.trained_runs if r.method == method)
    run_dir = folder / "out" / "runs" / run.run_id
    assert json.loads((run_dir / "run.json").read_text())["plugins"] == plan.config["plugins"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval",
            "--model",
            "moe-lora",
            "--model_args",
            f"run_dir={run_dir}" + (",trust_plugins=true" if method == "frozen_router" else ""),  # a plugin: opt in
            "--tasks",
            "moelora_suite",
            "--include_path",
            str(folder / "out" / "data" / "tasks"),
            "--output_path",
            str(tmp_path / "lm_eval"),
        ],
        cwd=folder,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = next((tmp_path / "lm_eval").rglob("results_*.json"))
    scores = json.loads(written.read_text())
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert scores["groups"]["moelora_suite"]["acc,none"] == pytest.approx(
        stored["suite_acc"], abs=1e-12
    )
    for task, value in stored["tasks"].items():
        assert scores["results"][f"moelora_{task}"]["acc,none"] == pytest.approx(
            value["acc"], abs=1e-12
        )


def _requests(lm, items):
    from harness.data.prompts import build_prompt, continuation

    requests = []
    for item in items:
        for choice in item["choices"]:
            context, cont = lm._encode_pair(build_prompt(item), continuation(choice))
            requests.append((None, context, cont))
    return requests


def test_lm_model_cached_lower_layers_give_the_full_depth_numbers(smoke):
    from harness.data.jsonl import load_jsonl
    from harness.model.lm_eval_model import HarnessLM

    folder, _, plan = smoke
    run = next(r for r in plan.trained_runs if r.method == "smora" and r.granularity > 1)
    run_dir = folder / "out" / "runs" / run.run_id
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        cached = HarnessLM(run_dir=str(run_dir), batch_size=7)
        full = HarnessLM(run_dir=str(run_dir), batch_size=7, lower_cache=False)
        tasks = folder / "out" / "data" / "tasks" / "data"
        items = [
            item for name in plan.config["data"]["tasks"][:2] for item in load_jsonl(tasks / f"{name}.jsonl")[:6]
        ]
        requests = _requests(cached, items)
        assert cached.run.split_start is not None and cached.run.split_start > 0
        with_cache = cached._loglikelihood_tokens(requests, disable_tqdm=True)
        without = full._loglikelihood_tokens(requests, disable_tqdm=True)

        # reference: every request alone, full depth, straight through the adapted model
        model = full.model
        reference = []
        with torch.no_grad():
            for _, context, cont in requests:
                ids = torch.tensor([context + cont])
                logits = model(input_ids=ids[:, :-1]).logits[0].float().log_softmax(-1)
                rows = logits[len(context) - 1 :]
                reference.append(
                    (
                        sum(float(rows[j, t]) for j, t in enumerate(cont)),
                        all(int(rows[j].argmax()) == t for j, t in enumerate(cont)),
                    )
                )
    finally:
        os.chdir(cwd)
    for (a, ga), (b, gb), (r, gr) in zip(with_cache, without, reference):
        assert a == pytest.approx(b, abs=1e-5) and a == pytest.approx(r, abs=1e-5)
        assert ga == gb == gr


def test_training_and_lm_eval_tokenise_prompts_identically(smoke):
    from harness.data.prompts import build_prompt, continuation
    from harness.model.lm_eval_model import HarnessLM
    from harness.run.train import build_examples

    folder, _, plan = smoke
    run = plan.trained_runs[0]
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        lm = HarnessLM(run_dir=str(folder / "out" / "runs" / run.run_id))
        items = [json.loads(line) for line in (folder / "out" / "data" / "train.jsonl").open()][:30]
        examples, truncated = build_examples(lm.tokenizer, items, max_length=64)
    finally:
        os.chdir(cwd)
    assert truncated == 0
    for item, example in zip(items, examples):
        context, cont = lm._encode_pair(
            build_prompt(item), continuation(item["choices"][item["label"]])
        )
        assert example.ids == context + cont
        assert example.targets == cont
        assert [example.ids[p + 1] for p in example.positions] == cont


def _readme_commands() -> list[str]:
    """The command lines of the README's "Useful commands" block (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Useful commands", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_every_readme_command_works_where_a_fresh_clone_has_results_but_no_weights(smoke, tmp_path):
    """Issue 16.10: each command of the README's "Useful commands" block, run as written (the
    default config and results folder swapped for the smoke study's), after deleting every
    weight file as a fresh clone of committed results lacks them. Runs last in this module:
    it deletes and rebuilds weights the tests above read."""
    import shutil

    folder, path, plan = smoke
    out = folder / "out"
    for adapter in list(out.rglob("adapter")):
        shutil.rmtree(adapter)
    for ckpt in list(out.rglob("checkpoint*")):
        shutil.rmtree(ckpt) if ckpt.is_dir() else ckpt.unlink()
    routed = next(r for r in plan.trained_runs if r.method == "smora")
    commands = _readme_commands()
    assert len(commands) >= 10 and any(c.startswith("lm_eval") for c in commands)
    bin_dir = Path(sys.executable).parent
    spec = tmp_path / "robustness.yaml"
    spec.write_text(yaml.safe_dump({"out": str(tmp_path / "robustness"), "conditions": [
        {"study": "smoke", "condition": "as configured", "config": str(path)}]}))
    done = []
    for command in commands:
        line = (
            command.replace("config/default.yaml", str(path))
            .replace("config/synthetic.yaml", str(path))
            .replace("results/default", str(out))
            .replace("results/synthetic", str(out))
            .replace("<run id>", routed.run_id)
            .replace("--out my-moa", f"--out {tmp_path / 'my-moa'}")
        )
        if line == "python -m harness robustness":
            line += f" --spec {spec}"
        if line.startswith("snakemake"):
            line = (f"{sys.executable} -m snakemake -s {ROOT / 'Snakefile'} --directory {folder} "
                    f"--configfile {path}" + line.removeprefix("snakemake"))
        elif line.startswith("lm_eval"):
            line = f"{bin_dir / 'lm_eval'} --output_path {tmp_path / 'lm_eval'}" + line.removeprefix("lm_eval")
        elif line.startswith("python"):
            line = sys.executable + line.removeprefix("python")
        result = subprocess.run(["bash", "-c", line], cwd=folder, env=_env(), capture_output=True,
                                text=True, timeout=900)
        assert result.returncode == 0, f"README command failed: {command}\n{(result.stdout + result.stderr)[-3000:]}"
        assert "Traceback" not in result.stderr, command
        done.append(command)
    assert done == commands
    # what the commands produced: weights restored, the re-score equal to the stored one,
    # the benchmark written, a MoA run composed over the restored task adapters
    assert (out / "runs" / routed.run_id / "adapter" / "adapter.safetensors").exists()
    scores = json.loads(next((tmp_path / "lm_eval").rglob("results_*.json")).read_text())
    stored = json.loads((out / "runs" / routed.run_id / "metrics.json").read_text())
    for task, value in stored["tasks"].items():
        assert scores["results"][f"moelora_{task}"]["acc,none"] == pytest.approx(value["acc"], abs=1e-12)
    assert (out / "bench" / "bench.md").exists()
    assert (tmp_path / "my-moa" / "metrics.json").exists() or (tmp_path / "my-moa" / "train.json").exists()
