"""The paper-scale study (issue 8): its budget on the meta device, its SLURM DAG, device
selection, the warm-up ratio, gradient checkpointing with SMoRA's bias, and the
``data.source: lm_eval`` path (train splits of lm-eval tasks, evaluation on them).

Nothing here needs a GPU, network or weights: the 7B models are built on the meta
device from the config.json files in harness/model/configs/, and the lm-eval path
runs on two local lm-eval task YAMLs over local JSON files.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from harness.plan.config import load_config, validate_config

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "config" / "paper.yaml"
PAPER_QWEN = ROOT / "config" / "paper-qwen.yaml"
FIXED_RULES = ("data", "summary", "tables", "figures", "all")


# -- the configs -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", [PAPER, PAPER_QWEN], ids=["llama", "qwen"])
def test_paper_configs_state_the_smora_study(path):
    config = load_config(path)
    assert config["budget"]["total_rank"] == 64 and config["budget"]["active_rank"] == 8
    assert config["budget"]["granularities"] == [8, 16, 32, 64]
    assert config["model"]["adapt_layers"] == "all"
    assert set(config["model"]["target_modules"]) == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"
    }
    assert config["model"]["dtype"] == "bfloat16"
    train = config["train"]
    assert (train["lr"], train["schedule"], train["epochs"]) == (1e-4, "cosine", 3)
    assert len(train["seeds"]) >= 3
    assert config["data"]["source"] == "lm_eval" and config["eval"]["tasks"]
    assert Path(ROOT / config["model"]["config_json"]).exists()


def test_lm_eval_source_needs_eval_tasks():
    from harness.plan.config import ConfigError

    raw = yaml.safe_load(PAPER.read_text())
    raw["eval"].pop("tasks")
    with pytest.raises(ConfigError, match=r"eval\.tasks"):
        validate_config(raw)


# -- the budget on the meta device -----------------------------------------------------------


@functools.cache
def _paper_plan(path: Path):
    """The study plan (budget solved on the meta device); read-only, so shared by tests."""
    from harness.plan.study import plan_study

    cwd = os.getcwd()
    os.chdir(ROOT)  # config_json is relative to the repository root
    try:
        return plan_study(load_config(path))
    finally:
        os.chdir(cwd)


def test_paper_budget_on_meta_device_matches_a_hand_count():
    plan = _paper_plan(PAPER)
    shapes = plan.shapes
    # Llama-2-7B: 32 decoder layers x 7 projections, hidden 4096, MLP 11008
    assert len(shapes) == 32 * 7
    q = [s for s in shapes if s.name.endswith("self_attn.q_proj")]
    down = [s for s in shapes if s.name.endswith("mlp.down_proj")]
    assert len(q) == 32 and {(s.d_in, s.d_out) for s in q} == {(4096, 4096)}
    assert {(s.d_in, s.d_out) for s in down} == {(11008, 4096)}

    from harness.adapters import get_method

    rows = {r.label: r for r in plan.rows}
    # by hand, for the q_proj layer type alone (32 modules of 4096 -> 4096):
    # LoRA rank 64: 64 * (4096 + 4096) per module
    lora = get_method("lora")
    assert lora.count_model(rows["lora-r64"].config, q).total == 32 * 64 * (4096 + 4096) == 16_777_216
    # SMoRA G = 64: A (64 x 4096) + B (4096 x 64) + router (64 x 4096); active: 8 ranks + router
    smora = rows["smora-G64"]
    count = get_method("smora").count_model(smora.config, q)
    assert count.router == 32 * 64 * 4096
    assert count.total == 32 * (64 * 4096 + 4096 * 64 + 64 * 4096) == 25_165_824
    assert count.activated == 32 * (8 * 4096 + 4096 * 8 + 64 * 4096) == 10_485_760
    # SiRA G = 8 (rank-8 experts, top-1): router 8 x 4096
    count = get_method("sira").count_model(rows["sira-G8"].config, q)
    assert (count.total, count.activated, count.router) == (
        32 * (64 * 8192 + 8 * 4096), 32 * (8 * 8192 + 8 * 4096), 32 * 8 * 4096
    )
    # whole model: every shape of a layer once, times 32 layers
    per_layer = 3 * 64 * (4096 + 4096) + 64 * (4096 + 4096) + 2 * 64 * (4096 + 11008) + 64 * (11008 + 4096)
    assert rows["lora-r64"].counts.total == 32 * per_layer == 159_907_840
    assert rows["lora-r8"].counts.total == 32 * per_layer // 8
    # matched budgets: routed methods equal LoRA-R in total and LoRA-K in activated,
    # router listed beside (router: separate)
    for label in ("sira-G8", "sira-G64", "smora-G16", "smora-G32"):
        row = rows[label]
        assert row.counts.total - row.counts.router == rows["lora-r64"].counts.total
        assert row.counts.activated - row.counts.router == rows["lora-r8"].counts.total


def test_paper_budget_is_verified_against_real_modules_on_meta(capsys):
    """What `python -m harness budget --config config/paper.yaml` prints: the counts of the
    real modules built on the meta device equal the analytic counts, for every row."""
    from harness.adapters import get_method
    from harness.plan.budget import verify_counts

    plan = _paper_plan(PAPER_QWEN)
    # Qwen2.5-7B: grouped-query attention, k_proj and v_proj 3584 -> 512; q/k/v have a bias
    k = [s for s in plan.shapes if s.name.endswith("k_proj")]
    assert len(k) == 28 and {(s.d_in, s.d_out) for s in k} == {(3584, 512)}
    methods = {r.method: get_method(r.method) for r in plan.rows}
    verify_counts(plan.rows, methods, plan.shapes)
    assert all(r.verified_total == r.counts.total for r in plan.rows)


# -- the SLURM DAG -------------------------------------------------------------------------


def _job_stats(output: str) -> dict[str, int]:
    block = output[output.index("Job stats:") :]
    stats = {}
    for line in block.splitlines()[3:]:
        match = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if not match:
            break
        stats[match[1]] = int(match[2])
    return stats


def test_slurm_dry_run_of_the_paper_dag():
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "snakemake", "-n", "--profile", "profiles/slurm",
         "--configfile", "config/paper.yaml"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    stats = _job_stats(out)

    # expected from the plan: methods x granularities x seeds (+ LoRA's two references
    # per seed), one evaluation per run plus the untrained base model, and the fixed rules
    config = load_config(PAPER)
    seeds = config["train"]["seeds"]
    grans = config["budget"]["granularities"]
    methods = [m if isinstance(m, str) else m["name"] for m in config["methods"]]
    mixtures = [m for m in methods if m != "lora"]
    expected_train = len(mixtures) * len(grans) * len(seeds) + 2 * len(seeds) * ("lora" in methods)
    plan = _paper_plan(PAPER)
    assert expected_train == len(plan.trained_runs) == 5 * 4 * 3 + 2 * 3
    # one job trains a run, another scores it (a failed scoring keeps the training); the
    # untrained base model is only scored
    expected_eval = expected_train + int(config["eval"]["include_base"])
    assert stats["train"] == expected_train
    assert stats["evaluate"] == expected_eval
    assert all(stats[rule] == 1 for rule in FIXED_RULES)
    assert stats["total"] == expected_train + expected_eval + len(FIXED_RULES) == 138

    # one GPU per training and evaluation job, with the profile's memory and time; the
    # CPU jobs ask for none
    jobs = re.split(r"\n(?=\[[^\n]*\]\nrule |rule )", out)
    resources = {}
    for job in jobs:
        rule = re.search(r"rule (\w+):", job)
        res = re.search(r"resources: (.*)", job)
        if rule and res:
            resources.setdefault(rule[1], res[1])
    for rule in ("train", "evaluate"):
        assert "gpu=1" in resources[rule] and "slurm_partition=" in resources[rule], resources[rule]
    assert "runtime=1680" in resources["train"] and "mem_mb=64000" in resources["train"]
    assert "gpu=" not in resources["data"] and "gpu=" not in resources["summary"]


def test_conda_env_pins_match_the_lock_file():
    env = yaml.safe_load((ROOT / "envs" / "harness.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    lock = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, _, version = line.partition("==")
            lock[name.strip().lower().replace("_", "-")] = version.strip()
    for spec in pip:
        name, _, version = spec.partition("==")
        assert version, f"envs/harness.yaml: {spec} is not pinned"
        assert lock[name.lower().replace("_", "-")] == version, spec
    # every rule that runs the harness names the env
    snakefiles = [ROOT / "Snakefile", *sorted((ROOT / "workflow" / "rules").glob("*.smk"))]
    text = "\n".join(p.read_text() for p in snakefiles)
    assert text.count("shell:") <= text.count("conda:")


# -- device, warm-up ----------------------------------------------------------------------


def test_device_selection_falls_back_to_cpu(monkeypatch):
    from contextlib import nullcontext

    from harness.model.base import autocast_context, select_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert select_device("auto") == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        select_device("cuda")
    assert isinstance(autocast_context(torch.device("cpu"), "float32"), nullcontext)
    # bf16 autocast runs on the CPU too (so the bf16 path is exercised without a GPU)
    ctx = autocast_context(torch.device("cpu"), "bfloat16")
    assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == "cpu"
    # with a GPU, auto picks it, and a bf16 model trains under bf16 autocast
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device("auto") == torch.device("cuda")
    assert select_device("cpu") == torch.device("cpu")
    made = []  # torch.autocast("cuda") itself needs a CUDA build: record the call instead
    monkeypatch.setattr(torch, "autocast", lambda *args, **kwargs: made.append((args, kwargs)) or "ctx")
    assert autocast_context(torch.device("cuda"), "bfloat16") == "ctx"
    assert made == [(("cuda",), {"dtype": torch.bfloat16})]
    assert isinstance(autocast_context(torch.device("cuda"), "float32"), nullcontext)
    assert validate_config(yaml.safe_load(PAPER.read_text()))["model"]["device"] in ("cuda", "auto")


def test_warmup_ratio_is_a_ceil_of_the_steps():
    from harness.plan.study import warmup_steps

    assert warmup_steps({"warmup_steps": 10, "warmup_ratio": None}, 200) == 10
    assert warmup_steps({"warmup_steps": 10, "warmup_ratio": 0.1}, 27_669) == 2767
    assert warmup_steps({"warmup_steps": 10, "warmup_ratio": 0.1}, 5) == 1
    assert warmup_steps({"warmup_steps": 10, "warmup_ratio": 1.0}, 7) == 7
    assert warmup_steps({"warmup_steps": 50}, 8) == 8


# -- gradient checkpointing and SMoRA's bias ----------------------------------------------

TINY = {
    "source": "tiny-random",
    "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "seed": 0},
    "adapt_layers": {"top": 2},
}


def _tiny_study(tmp_path: Path, **sections) -> dict:
    raw = {
        "study": "paper-test",
        "out_dir": str(tmp_path / "out"),
        "cache_dir": str(tmp_path / "cache"),
        "model": TINY,
        "budget": {"total_rank": 8, "active_rank": 2, "granularities": [8]},
        "methods": ["smora"],
        "data": {"source": "generated", "train_per_task": 8, "test_per_task": 4},
        "train": {"seeds": [0], "steps": 4, "batch_size": 6, "checkpoint_every": 0,
                  "lr": 0.01, "warmup_ratio": 0.25},
        "eval": {"include_base": False},
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) else value
    return validate_config(raw)


def test_gradient_checkpointing_keeps_smora_bias_updates_once_per_step(tmp_path, monkeypatch):
    """With gradient checkpointing every layer's forward runs again inside backward; the
    routers must see the same token masks there, and the bias must move once per optimizer
    step, exactly as without checkpointing."""
    from harness.data.prepare import prepare_data
    from harness.plan.study import plan_study
    from harness.run.train import train_run
    from methods.smora import SMoRALayer

    calls, routes = [], []
    original, route = SMoRALayer.after_optimizer_step, SMoRALayer.route
    monkeypatch.setattr(
        SMoRALayer, "after_optimizer_step", lambda self: (calls.append(1), original(self))[1]
    )
    monkeypatch.setattr(  # which token mask each routing call saw (None: no mask)
        SMoRALayer, "route", lambda self, x, mask: (routes.append(mask is not None), route(self, x, mask))[1]
    )
    results = {}
    for checkpointing in (False, True):
        config = _tiny_study(tmp_path, train={"gradient_checkpointing": checkpointing})
        config["methods"] = [{"name": "smora", "options": {"bias_update_rate": 0.01}}]
        prepare_data(config["data"], Path(config["out_dir"]) / "data")
        plan = plan_study(config)
        run = plan.trained_runs[0]
        run_dir = tmp_path / f"run-{checkpointing}"
        calls.clear()
        routes.clear()
        summary = train_run(config, run, run_dir, progress=False)
        n_modules = len(plan.shapes)
        assert len(calls) == summary["steps"] * n_modules  # once per module per step
        # checkpointing really reruns every routed forward in backward, with the masks set
        assert len(routes) == summary["steps"] * n_modules * (2 if checkpointing else 1)
        assert all(routes)
        from safetensors.torch import load_file

        state = next((run_dir / "adapter").glob("*.safetensors"))
        biases = {k: v for k, v in load_file(state).items() if k.endswith("selection_bias")}
        assert len(biases) == n_modules
        log = [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
        results[checkpointing] = (biases, [r["loss"] for r in log], [r["lr"] for r in log])
    (b0, loss0, lr0), (b1, loss1, lr1) = results[False], results[True]
    for name, bias in b0.items():
        # each step moves every entry by -0.01, 0 or +0.01: the sum of 4 such moves
        steps = bias / 0.01
        assert torch.allclose(steps, steps.round(), atol=1e-4) and steps.abs().max() <= 4
        assert torch.equal(bias, b1[name]), name
    assert any(b.abs().sum() > 0 for b in b0.values())
    assert loss0 == pytest.approx(loss1, rel=1e-5, abs=1e-6)
    # warmup_ratio 0.25 of 4 steps: one warm-up step, then cosine decay
    assert lr0 == lr1 and lr0[0] == pytest.approx(0.01) and lr0[1] < lr0[0]


# -- data.source lm_eval: training mixture and evaluation from lm-eval tasks --------------


def _write_local_lm_eval_tasks(folder: Path) -> list[str]:
    """Two multiple-choice lm-eval tasks over local JSON files (train + validation)."""
    folder.mkdir(parents=True)
    data = folder.parent / "json"
    data.mkdir()
    words = ["red", "blue", "green", "cat", "dog", "fish"]
    names = []
    for t, kind in enumerate(("colour", "animal")):
        for split, n in (("train", 12), ("validation", 6)):
            rows = []
            for i in range(n):
                choices = words[:3] if t == 0 else words[3:]
                rows.append({"q": f"Pick the {kind} number {i % 3}.", "options": choices,
                             "answer": i % 3})
            (data / f"{kind}_{split}.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in rows)
            )
        name = f"toy_{kind}"
        names.append(name)
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name,
            "dataset_path": "json",
            "dataset_kwargs": {
                "data_files": {s: str(data / f"{kind}_{s}.jsonl") for s in ("train", "validation")},
                "cache_dir": str(folder.parent / "hf_cache"),
            },
            "output_type": "multiple_choice",
            "training_split": "train",
            "validation_split": "validation",
            "doc_to_text": "Question: {{q}}\nAnswer:",
            "doc_to_choice": "{{options}}",
            "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }))
    return names


def test_lm_eval_source_trains_on_train_splits_and_scores_eval_tasks(tmp_path):
    from harness.analysis.results import suite_score
    from harness.data.prepare import prepare_data
    from harness.plan.study import plan_study
    from harness.run.evaluate import evaluate_run
    from harness.run.train import train_run

    tasks = _write_local_lm_eval_tasks(tmp_path / "tasks")
    config = _tiny_study(
        tmp_path,
        data={"source": "lm_eval", "tasks": tasks, "include_path": str(tmp_path / "tasks"),
              "train_per_task": None},
        eval={"tasks": tasks, "include_base": True, "batch_size": 8},
        train={"steps": 2, "batch_size": 4},
    )
    config["data"] = {k: v for k, v in config["data"].items() if k != "test_per_task"}
    config["methods"] = ["lora"]
    config["budget"]["granularities"] = [4]
    summary = prepare_data(config["data"], Path(config["out_dir"]) / "data")
    assert summary["group"] is None and summary["tasks"] == []
    assert summary["train_counts"] == {t: 12 for t in tasks}
    items = [json.loads(line) for line in (Path(config["out_dir"]) / "data" / "train.jsonl")
             .read_text().splitlines()]
    first = items[0]
    # lm-eval's own rendering: its doc_to_text and its target delimiter
    assert first["context"] == "Question: Pick the colour number 0.\nAnswer:"
    assert first["continuation"] == " red" and first["label"] == 0

    plan = plan_study(config)
    run = next(r for r in plan.trained_runs if r.tag == "r8")
    train_run(config, run, plan.run_dir(run), progress=False)
    for r in (run, next(r for r in plan.runs if r.is_base)):
        metrics = evaluate_run(config, r, plan.run_dir(r), progress=False)
        assert set(metrics["tasks"]) == set(tasks)
        accs = [metrics["tasks"][t]["acc"] for t in tasks]
        assert all(0.0 <= a <= 1.0 for a in accs)
        assert metrics["suite_acc"] == pytest.approx(sum(accs) / len(accs))
        assert suite_score(metrics) == pytest.approx(metrics["suite_acc"])
        assert not math.isnan(metrics["suite_acc"])
