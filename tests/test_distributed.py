"""Data parallelism (issue 32): two ranks on CPU (torchrun, gloo, one thread each) against one
process with the same global batch and seed, for LoRA and every routed built-in method.

One torchrun launch trains every method (and a resumed SMoRA run) on two ranks; the
one-process reference trains in this process with SiRA's capacity decided per shard of
the batch (``simulated_shards(2)``, the rule of docs/cluster.md). Compared step by step:
the logged loss, auxiliary loss and gradient norm (relative 1e-5), the routing statistics
(expert loads) and SMoRA's selection bias, which is updated from the loads summed over the
ranks.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.conftest import TINY_STUDY_MODEL as TINY

ROOT = Path(__file__).resolve().parent.parent
STEPS = 20
REL = 1e-5
METHODS = [
    "lora",
    {"name": "molora", "options": {"sparse": True}},
    # expert dropout draws its masks per rank (same distribution, other draws): off here
    {"name": "sira", "options": {"expert_dropout": 0.0}},
    "smora",
    "malora",
    {"name": "loramoe", "options": {"knowledge_tasks": ["color"]}},
    "hydralora",
    "mode",
    "mola",
    "moa",
]


def study_config(folder: Path) -> Path:
    config = {
        "study": "ddp",
        "out_dir": str(folder / "out"),
        "cache_dir": str(folder / ".cache"),
        "model": TINY,
        "budget": {"total_rank": 6, "active_rank": 2, "granularities": [3], "alpha": 8},
        "methods": METHODS,
        "data": {
            "source": "generated",
            "tasks": ["color", "animal", "tool"],
            "train_per_task": 8,
            "test_per_task": 4,
        },
        "train": {"seeds": [0], "steps": STEPS, "batch_size": 4, "lr": 0.02, "checkpoint_every": 5,
                  "processes": 2},
        "eval": {"include_base": False},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def read_log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]


def close(a, b, rel: float = REL, abs_: float = 1e-6) -> bool:
    if a is None or b is None:
        return a is b
    return abs(a - b) <= max(rel * max(abs(a), abs(b)), abs_)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``(plan, {run_id: reference folder}, two-rank folder, resumed folder)``."""
    from harness.adapters.distributed import simulated_shards
    from harness.data.prepare import prepare_data
    from harness.model.run_folder import write_run_spec
    from harness.plan.config import load_config
    from harness.plan.study import plan_study
    from harness.run.train import train_run

    folder = tmp_path_factory.mktemp("ddp")
    path = study_config(folder)
    config = load_config(path)
    plan = plan_study(config)
    prepare_data(config["data"], plan.out_dir / "data")
    for component in plan.components:  # MoA's task LoRAs, shared by both sides
        write_run_spec(config, component, plan.run_dir(component))
        train_run(config, component, plan.run_dir(component), progress=False)
    trained = {run.run_id: run for run in plan.trained_runs}
    smora = next(r for r in trained if r.startswith("smora"))
    jobs = [[rid, rid, None] for rid in trained] + [[smora, "resumed", 10], [smora, "resumed", None]]
    ranks = folder / "ranks"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    launch = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(ROOT / "tests" / "distributed_ranks.py"), str(path), str(ranks), json.dumps(jobs)],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    # the one-process reference trains meanwhile (the machine's other core)
    reference = folder / "reference"
    with simulated_shards(2):
        for rid, run in trained.items():
            train_run(config, run, reference / rid, progress=False)
    output, _ = launch.communicate(timeout=900)
    assert launch.returncode == 0, output[-4000:]
    return trained, reference, ranks, smora


@pytest.mark.parametrize("method", [m if isinstance(m, str) else m["name"] for m in METHODS])
def test_two_ranks_equal_one_process(runs, method):
    trained, reference, ranks, _ = runs
    rids = [r for r, run in trained.items() if run.method == method]
    assert rids
    for rid in rids:
        compare(reference / rid, ranks / rid, rid, routed=method != "lora")


def compare(one_dir: Path, two_dir: Path, rid: str, routed: bool) -> None:
    one, two = read_log(one_dir), read_log(two_dir)
    # every step logged once (MoA's router stage has its own step count)
    assert [r["step"] for r in two] == [r["step"] for r in one] == list(range(len(one)))
    assert len(one) == STEPS or rid.startswith("moa")
    for a, b in zip(one, two, strict=True):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert close(a[key], b[key]), (rid, a["step"], key, a[key], b[key])
        assert ("expert_load" in a) == ("expert_load" in b)
        if a.get("expert_load") is not None:
            for module, load in a["expert_load"].items():
                assert torch.allclose(torch.tensor(load), torch.tensor(b["expert_load"][module]), atol=1e-5), (
                    rid, a["step"], module, load, b["expert_load"][module])
    # only rank 0 wrote: one log, one adapter, one train.json, no checkpoint left behind
    summary = json.loads((two_dir / "train.json").read_text())
    assert summary["processes"] == 2 and summary["batch_size"] == 4
    assert not (two_dir / "checkpoints").exists()
    if routed:
        assert [r for r in two if r.get("expert_load")], f"{rid}: no routing statistics logged"


def test_smora_bias_from_loads_summed_over_ranks(runs):
    _trained, reference, ranks, smora = runs
    one = load_file(reference / smora / "adapter" / "adapter.safetensors")
    two = load_file(ranks / smora / "adapter" / "adapter.safetensors")
    biases = [k for k in one if k.endswith("selection_bias")]
    assert biases
    for key in biases:
        assert one[key].abs().sum() > 0, f"{key}: the bias never moved"
        assert torch.allclose(one[key], two[key], atol=1e-7), (key, one[key], two[key])


def test_two_ranks_resume(runs):
    _trained, _reference, ranks, smora = runs
    whole, resumed = read_log(ranks / smora), read_log(ranks / "resumed")
    summary = json.loads((ranks / "resumed" / "train.json").read_text())
    assert summary["resumed_from_step"] == 10
    assert [r["step"] for r in resumed] == list(range(STEPS))
    for a, b in zip(whole, resumed, strict=True):
        for key in ("loss", "aux_loss", "grad_norm"):
            assert close(a[key], b[key], rel=1e-6), (a["step"], key, a[key], b[key])
    one = load_file(ranks / smora / "adapter" / "adapter.safetensors")
    two = load_file(ranks / "resumed" / "adapter" / "adapter.safetensors")
    assert all(torch.equal(one[k], two[k]) for k in one)


def test_batch_must_split_into_equal_shards(tmp_path):
    from harness.run.train import relaunch_under_torchrun

    config = {"out_dir": str(tmp_path), "model": {"device": "cpu"}, "train": {"processes": 3, "batch_size": 4}}
    with pytest.raises(ValueError, match=r"train.batch_size = 4 does not split into 3 equal shards"):
        relaunch_under_torchrun(config, ["train"])


def test_cluster_docs_match_the_plan_and_the_profile():
    """docs/cluster.md's job counts are the paper plan's (one train job per trained run, one
    evaluate job per run and the base model, five fixed rules: what test_paper.py checks
    against the dry run), and its per-job time and GPU counts are the SLURM profile's."""
    from tests.test_paper import FIXED_RULES, PAPER, _paper_plan

    doc = (ROOT / "docs" / "cluster.md").read_text()
    match = re.search(r"The dry run lists (\d+) jobs: (\d+) `train` .*?\), (\d+) `evaluate`", doc, re.S)
    assert match, "docs/cluster.md: the dry-run sentence is missing"
    total, train, evaluate = map(int, match.groups())
    config = yaml.safe_load(PAPER.read_text())
    plan = _paper_plan(PAPER)
    trained = len(plan.trained_runs)
    assert train == trained
    assert evaluate == trained + int(config["eval"].get("include_base", True))
    assert total == train + evaluate + len(FIXED_RULES)

    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    minutes = profile["set-resources"]["train"]["runtime"]
    assert f"`train`\n{minutes // 60} h ({minutes} min)" in doc or f"`train` {minutes // 60} h ({minutes} min)" in doc
    assert "gpu" not in profile["set-resources"]["train"]  # the rule asks for train.processes GPUs
    assert profile["default-resources"]["slurm_partition"] != profile["set-resources"]["train"]["slurm_partition"]
    smk = (ROOT / "workflow" / "rules" / "runs.smk").read_text()
    assert 'gpu=STUDY["train"].get("processes", 1)' in smk


def test_bench_ranks_compares_at_least_two_ranks_and_is_in_the_cli_help(tmp_path):
    """The speed of N ranks is measured by ``python -m harness bench-ranks`` (never asserted
    here): one rank is not a comparison, and the command is listed."""
    from harness.bench.ranks import bench_ranks
    from harness.cli.main import build_parser

    with pytest.raises(ValueError, match="--processes 1: compare at least 2 ranks against 1"):
        bench_ranks({"methods": ["lora"]}, tmp_path, 1)
    assert "bench-ranks" in build_parser().format_help()
