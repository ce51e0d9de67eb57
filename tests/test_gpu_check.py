"""scripts/gpu_check.sh: the CPU fallback end to end (its real outputs), usage errors, the
refusal of CUDA without a GPU, and the offline-install constraints that keep torch."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
METHODS = ["lora", "multilora", "molora", "sira", "smora", "malora"]


def run(*args: str, timeout: int = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHON": sys.executable, **env},
    )


@pytest.mark.slow
def test_cpu_fallback_runs_every_step_and_writes_the_summary(tmp_path):
    out = tmp_path / "gpu-check"
    res = run("--device", "cpu", "--tiny", "--out", str(out), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "all steps passed" in res.stdout

    device = json.loads((out / "device.json").read_text())
    assert device["device"] == "cpu" and device["torch"] == torch.__version__
    assert (out / "device.txt").read_text().startswith("device:")
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps] == ["device", "smoke", "tests", "bench"]
    assert all(s[1] == "ok" for s in steps), steps
    for name in ("device", "smoke", "tests", "bench"):
        assert (out / "logs" / f"{name}.log").stat().st_size > 0

    # the smoke study ran through Snakemake on the CPU into <out>/smoke
    smoke = (out / "smoke.yaml").read_text()
    assert "device: cpu" in smoke and "dtype: float32" in smoke and "study: gpu-smoke" in smoke
    summary_csv = list(csv.DictReader((out / "smoke" / "summary.csv").read_text().splitlines()))
    assert {r["method"] for r in summary_csv} >= {"lora", "smora"}
    assert (out / "smoke" / "tables" / "main_table.md").exists()

    # the CUDA tests were collected and skipped (no GPU here), with a junit file
    junit = (out / "pytest-cuda.xml").read_text()
    assert 'skipped="' in junit and "CUDA is not available" in junit

    # the benchmark: every method (and both LoRA references) with a ratio to LoRA rank R
    rows = list(csv.DictReader((out / "bench" / "bench.csv").read_text().splitlines()))
    assert {r["method"] for r in rows} == set(METHODS)
    summary = (out / "summary.md").read_text()
    assert "all steps passed" in summary
    table = [line.split("|")[1:-1] for line in summary.splitlines()
             if line.startswith("| ") and not line.startswith("| method") and not line.startswith("| step")]
    ratio_rows = {}
    for cells in table:
        cells = [c.strip() for c in cells]
        if len(cells) >= 6 and cells[0] in METHODS:
            ratio_rows.setdefault(cells[0], []).append(float(cells[5]))
    assert set(ratio_rows) == set(METHODS), summary
    assert all(r > 0 for rs in ratio_rows.values() for r in rs)
    assert 1.0 in ratio_rows["lora"]  # LoRA rank R itself
    assert "Sparse vs dense crossover" in summary
    assert not (out / ".bin").exists()


def test_bad_flag_gives_a_usage_error_and_exit_code_2():
    res = run("--devise", "cuda")
    assert res.returncode == 2
    assert "unknown option '--devise'" in res.stderr and "--help" in res.stderr
    res = run("--device", "tpu")
    assert res.returncode == 2 and "--device must be cuda or cpu" in res.stderr
    res = run("--out")
    assert res.returncode == 2 and "--out needs a value" in res.stderr
    res = run("--dtype", "int8")
    assert res.returncode == 2 and "--dtype must be float32 or bfloat16" in res.stderr
    res = run("--python-version", "3.11")
    assert res.returncode == 2 and "only apply to --download-wheels" in res.stderr
    res = run("--skip", "everything")
    assert res.returncode == 2 and "--skip takes" in res.stderr


def test_refuses_to_replace_folders_in_an_out_dir_it_did_not_write(tmp_path):
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "keep.txt").write_text("not ours")
    res = run("--device", "cpu", "--tiny", "--out", str(tmp_path))
    assert res.returncode == 2 and "was not written by" in res.stderr
    assert (tmp_path / "bench" / "keep.txt").read_text() == "not ours"


def test_help_documents_every_flag():
    res = run("--help")
    assert res.returncode == 0
    text = SCRIPT.read_text()
    flags = set(re.findall(r"^\s+(--[a-z-]+)(?:=\*)?\)", text, flags=re.MULTILINE))
    assert {"--device", "--tiny", "--out", "--wheels", "--download-wheels", "--python-version"} <= flags
    for flag in flags:
        assert flag in res.stdout, f"{flag} is accepted but not in --help"
    assert "-h, --help" in res.stdout and "Exit status" in res.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_fails_at_once_with_the_reason(tmp_path):
    res = run("--device", "cuda", "--out", str(tmp_path / "x"))
    assert res.returncode == 3
    assert "CUDA was requested" in res.stderr
    assert not (tmp_path / "x").exists()


def _tools():
    spec = importlib.util.spec_from_file_location("gpu_check_tools", ROOT / "scripts" / "gpu_check_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_constraints_pin_the_installed_torch_and_leave_its_stack_alone(tmp_path):
    tools = _tools()
    out = tmp_path / "constraints.txt"
    tools.constraints(ROOT / "requirements.lock", out)
    lines = [line for line in out.read_text().splitlines() if line and not line.startswith("#")]
    assert f"torch=={torch.__version__}" in lines
    names = [tools.canonical(line.split("==")[0]) for line in lines]
    assert names.count("torch") == 1
    assert not any(n.startswith("nvidia-") or n == "triton" for n in names)
    closure = tools.torch_closure()
    assert "torch" in closure and not (set(names) - {"torch"}) & closure  # e.g. sympy, filelock
    assert "transformers==" + dict(tools.read_lock(ROOT / "requirements.lock"))["transformers"] in lines
    listed = tmp_path / "download.txt"
    tools.download_list(ROOT / "requirements.lock", listed)
    pins = listed.read_text().split()
    assert not any(p.lower().startswith(("torch==", "triton==", "nvidia-")) for p in pins)
    assert len(pins) == len(tools.read_lock(ROOT / "requirements.lock")) - 1


def test_device_slug_and_summary_crossover_point():
    from harness.bench.crossover import crossover_point  # the summary step's one rule

    tools = _tools()
    assert tools.slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert tools.slug("NVIDIA A100-SXM4-40GB") == "nvidia-a100-sxm4-40gb"
    rows = [{"experts_per_top_k": str(r), "sparse_over_dense": str(v)}
            for r, v in ((8, 1.4), (16, 1.1), (32, 0.9), (64, 0.8), (128, 0.7))]
    assert crossover_point(rows) == 32  # numbers as text, as read from the CSV
    rows[-1]["sparse_over_dense"] = "1.2"  # dense wins again at the largest count: no crossover
    assert crossover_point(rows) is None
