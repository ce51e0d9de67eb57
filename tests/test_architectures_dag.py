"""Full depth on three architectures (issue 32): tiny random Llama, Qwen2 and Mistral models
(``model.tiny.architecture``), every decoder layer adapted, each study through the whole
Snakemake DAG (data -> train -> evaluate -> summary -> tables, figures) with peft's LoRA or
a routed method. With every layer adapted nothing lies below the first adapted layer: no
lower-layer cache is built or read, and the run records say so.

The three studies run as three concurrent Snakemake invocations (one core each): most of
their time is the start of each job's Python process, not the tiny models' arithmetic."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from safetensors import safe_open

from harness.adapters import get_method
from harness.model.base import attach_method, load_base
from harness.model.load import planning_model
from harness.plan.config import load_config
from harness.plan.study import plan_study

ROOT = Path(__file__).resolve().parent.parent
#: each architecture's method: peft's LoRA (its two references, ranks R and K) on Qwen2, two
#: routed built-ins on the others. One method a study keeps the cost down (every job is a
#: Python start of seconds): LoRA and a routed method on every architecture would be 30 jobs
#: instead of 20 (about 380 CPU-seconds instead of about 250).
ARCHITECTURES = {"llama": "smora", "qwen2": "lora", "mistral": "sira"}
PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = {"q_proj", "k_proj", "v_proj", "o_proj"}
LAYERS = 2


def _study(folder: Path, architecture: str) -> Path:
    config = {
        "study": f"arch-{architecture}",
        "out_dir": "out",
        "model": {
            "source": "tiny-random",
            "tiny": {
                "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LAYERS,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512, "seed": 0,
                "architecture": architecture,
            },
            "adapt_layers": "all",
            "target_modules": PROJECTIONS,
        },
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": [ARCHITECTURES[architecture]],
        "data": {"source": "generated", "tasks": ["animal", "color"], "train_per_task": 8, "test_per_task": 4},
        "train": {"seeds": [0], "steps": 3, "batch_size": 4, "warmup_steps": 1, "checkpoint_every": 0},
        "eval": {"include_base": False, "batch_size": 64},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }


@pytest.fixture(scope="module")
def studies(tmp_path_factory):
    """``{architecture: (folder, loaded config, plan)}``, every study run to its end."""
    started = time.perf_counter()
    jobs = {}
    for arch in ARCHITECTURES:
        folder = tmp_path_factory.mktemp(f"arch-{arch}")
        path = _study(folder, arch)
        command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
                   str(folder), "--cores", "1", "--configfile", str(path)]
        jobs[arch] = (folder, path, subprocess.Popen(
            command, cwd=folder, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    out = {}
    for arch, (folder, path, process) in jobs.items():
        log, _ = process.communicate(timeout=1200)
        assert process.returncode == 0, f"{arch}: {log[-4000:]}"
        config = load_config(path)
        config["out_dir"] = str(folder / "out")
        out[arch] = (folder, config, plan_study(config))
    print(f"three architectures through the DAG: {time.perf_counter() - started:.1f} s wall")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_layer_of_each_architecture_is_adapted_and_scored(studies, arch):
    folder, config, plan = studies[arch]
    out = folder / "out"
    (model_dir,) = [p for p in (folder / ".cache" / "models").iterdir() if p.is_dir()]
    built = json.loads((model_dir / "config.json").read_text())
    assert built["architectures"] == [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                                       "mistral": "MistralForCausalLM"}[arch]]
    assert model_dir.name.startswith(f"tiny-random-{arch}-")
    expected = [f"model.layers.{i}.{'self_attn' if p in ATTENTION else 'mlp'}.{p}"
                for i in range(LAYERS) for p in PROJECTIONS]
    assert len(expected) == LAYERS * len(PROJECTIONS)
    trained = [r for r in plan.runs if not r.is_base]
    method = ARCHITECTURES[arch]
    assert [r.method for r in trained] == [method] * (2 if method == "lora" else 1)
    summary = pd.read_csv(out / "summary.csv")
    assert sorted(summary["run_id"]) == sorted(r.run_id for r in plan.runs)
    for run in trained:
        run_dir = out / "runs" / run.run_id
        adapter = json.loads((run_dir / "adapter" / "adapter.json").read_text())
        assert sorted(adapter["targets"]) == sorted(expected)
        with safe_open(str(run_dir / "adapter" / "adapter.safetensors"), "pt") as weights:
            keys = list(weights.keys())
            # every adapted module holds trained weights; training moved the zero-initialised B
            modules = {k.split(".lora_")[0] for k in keys if ".lora_" in k}
            assert modules == set(expected)
            assert all(weights.get_tensor(k).abs().sum() > 0 for k in keys if ".lora_B" in k)
        train = json.loads((run_dir / "train.json").read_text())
        assert train["lower_layer_cache"] == {"enabled": False, "split_layer": None, "seconds": 0.0,
                                              "built_here": False}
        assert train["timing"]["cache_build_s"] == 0.0
        assert math.isfinite(train["final_loss"]) and math.isfinite(train["first_loss"])
        metrics = json.loads((run_dir / "metrics.json").read_text())
        row = summary[summary["run_id"] == run.run_id].iloc[0]
        assert math.isfinite(metrics["suite_acc"]) and 0 <= metrics["suite_acc"] <= 1
        assert row["suite_acc"] == pytest.approx(metrics["suite_acc"])
        for task in config["data"]["tasks"]:
            assert math.isfinite(row[f"score_{task}"])
    # no lower layers: no cache folder, no cached hidden states anywhere in the study
    assert not (folder / ".cache" / "lower").exists()
    assert not list(folder.rglob("lower-*.safetensors"))
    for name in ("main_table", "budget_table", "significance"):
        assert (out / "tables" / f"{name}.csv").stat().st_size > 0
    for name in ("granularity", "params_vs_acc", "training_curves"):
        assert (out / "figures" / f"{name}.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_an_untrained_adapter_on_every_layer_leaves_the_base_output_unchanged(studies, arch):
    """At step 0 (the run's own seed, before training) every method's output is the base
    model's, bit for bit: the adapters start as the identity on every layer."""
    folder, config, plan = studies[arch]
    ids = torch.tensor([[5, 17, 42, 99, 7, 250, 3]])
    base = load_base(config["model"], folder / ".cache", device="cpu")
    assert base.split_start is None  # every layer adapted: full depth, nothing cached
    with torch.no_grad():
        reference = base.model(input_ids=ids).logits
    for run in (r for r in plan.runs if not r.is_base):
        base = load_base(config["model"], folder / ".cache", device="cpu")
        method = get_method(run.method)
        attach_method(base, method, method.make_config(**run.method_config), seed=run.seed)
        with torch.no_grad():
            logits = base.model(input_ids=ids).logits
        assert torch.equal(logits, reference), (run.run_id, (logits - reference).abs().max())


def test_the_default_architecture_keeps_run_ids_and_each_other_builds_its_own_class(tmp_path):
    """``architecture`` left out and ``llama`` written plan the same run ids (the ids of
    before the key existed); another architecture is another model, so other ids."""
    ids, classes = {}, {}
    for arch in (None, *ARCHITECTURES):
        folder = tmp_path / str(arch)
        folder.mkdir()
        config = load_config(_study(folder, arch or "llama"))
        if arch is None:
            del config["model"]["tiny"]["architecture"]
        ids[arch] = [r.run_id for r in plan_study(config).runs]
        classes[arch] = type(planning_model(config["model"])).__name__
    assert ids[None] == ids["llama"]
    assert len({tuple(v) for v in ids.values()}) == 3
    assert classes == {None: "LlamaForCausalLM", "llama": "LlamaForCausalLM",
                       "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
