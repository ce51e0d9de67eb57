"""Helpers shared by the tests that run studies through the CLI and Snakemake in a
temporary folder: a tiny study config, the environment, the commands, and readers of what
they planned and wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import TINY_STUDY_MODEL as TINY

ROOT = Path(__file__).resolve().parent.parent



def study_config(tmp_path: Path, **overrides) -> Path:
    config = {
        "study": "rel",
        "out_dir": "out",
        "model": TINY,
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": ["smora"],
        "data": {"source": "generated", "train_per_task": 8, "test_per_task": 4},
        "train": {"seeds": [0], "steps": 12, "batch_size": 4, "checkpoint_every": 3},
        "eval": {"include_base": False},
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            config[section] = {**config[section], field: value}
        else:
            config[section] = value
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def env(extra_path: Path | None = None) -> dict[str, str]:
    out = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TQDM_DISABLE": "1",
        # the jobs Snakemake starts call `python`: the interpreter running the tests
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    if extra_path is not None:
        out["PYTHONPATH"] = f"{extra_path}{os.pathsep}{out.get('PYTHONPATH', '')}"
    return out


def harness(args, cwd: Path, extra_path: Path | None = None, **kwargs):
    return subprocess.run(
        [sys.executable, "-m", "harness", *args],
        cwd=cwd,
        env=env(extra_path),
        capture_output=True,
        text=True,
        timeout=600,
        **kwargs,
    )


def snakemake(args, cwd: Path, extra_path: Path | None = None):
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
        env=env(extra_path),
        capture_output=True,
        text=True,
        timeout=600,
    )


def metrics_target(config: Path, cwd: Path) -> str:
    """The first run's metrics file: a snakemake target that skips tables and figures."""
    return f"out/runs/{run_ids(config, cwd)[0]}/metrics.json"


def run_ids(config: Path, cwd: Path) -> list[str]:
    """What `python -m harness plan` lists (planned in-process: no files are touched)."""
    from harness.adapters import load_plugin
    from harness.plan.config import load_config
    from harness.plan.study import plan_study

    loaded = load_config(config)
    sys.path.insert(0, str(cwd))
    try:
        for plugin in loaded["plugins"]:
            load_plugin(plugin)
        return [run.run_id for run in plan_study(loaded).runs]
    finally:
        sys.path.remove(str(cwd))


def strip_volatile(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("timing", "provenance")}


def cli(args, capsys, monkeypatch, cwd: Path) -> tuple[int, str, str]:
    """``python -m harness ARGS`` in-process (no interpreter start-up): exit code, out, err."""
    from harness.cli.main import main

    monkeypatch.chdir(cwd)
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def jsonl_study(tmp_path: Path, train_items, test_items, **overrides) -> Path:
    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("".join(json.dumps(it) + "\n" for it in train_items))
    test.write_text("".join(json.dumps(it) + "\n" for it in test_items))
    return study_config(tmp_path, data={"source": "jsonl", "train": str(train), "test": str(test)}, **overrides)


def suite_items(tasks=("color", "animal"), n=8):
    from harness.data.suite import generate_suite

    suite = generate_suite(1, list(tasks), n, 4)
    return suite["train"], suite["test"]


def planned_jobs(output: str) -> dict[str, int]:
    """Rule -> job count from Snakemake's "Job stats" table (empty: nothing to do)."""
    if "Job stats:" not in output:
        return {}
    jobs = {}
    for line in output.split("Job stats:", 1)[1].splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        jobs[parts[0]] = int(parts[1])
    return jobs


def file_tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


