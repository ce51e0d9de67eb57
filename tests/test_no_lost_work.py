"""No finished work is lost (issue 31, point 4): a failed scoring keeps the finished training
and the rerun only scores; ``check`` proves before any job that every eval task's data
loads; a study's out_dir is locked by the process working in it, from any checkout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.common.lock import acquire, read_holder, release
from tests.studies import ROOT, cli, env, planned_jobs, run_ids, snakemake, study_config

CHOICES = ["red", "blue", "green"]


def eval_task(tmp_path: Path, **dataset) -> tuple[Path, Path]:
    """An lm-eval task ``extra_qa`` in ``tmp_path/tasks`` whose test split is a local JSON
    file (or, with ``dataset``, another dataset): ``(its data file, the task folder)``."""
    data = tmp_path / "evaldata" / "extra.jsonl"
    data.parent.mkdir()
    data.write_text("".join(
        json.dumps({"q": f"Which colour is number {i}?", "options": CHOICES, "answer": i % 3}) + "\n"
        for i in range(6)
    ))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    source = dataset or {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf_cache")},
    }
    (tasks / "extra_qa.yaml").write_text(yaml.safe_dump({
        "task": "extra_qa",
        **source,
        "output_type": "multiple_choice",
        "test_split": "test",
        "doc_to_text": "Question: {{q}}\nAnswer:",
        "doc_to_choice": "{{options}}",
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }))
    return data, tasks


def eval_study(tmp_path: Path, tasks: Path, **overrides) -> Path:
    return study_config(
        tmp_path, train__steps=3, train__checkpoint_every=0,
        eval={"include_base": False, "batch_size": 8, "tasks": ["extra_qa"], "include_path": str(tasks)},
        **overrides,
    )


def _state(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.mark.slow
def test_a_failed_scoring_keeps_the_training_and_the_rerun_only_scores(tmp_path):
    data, tasks = eval_task(tmp_path)
    path = eval_study(tmp_path, tasks)
    (run_id,) = run_ids(path, tmp_path)
    run_dir = tmp_path / "out" / "runs" / run_id
    target = f"out/runs/{run_id}/metrics.json"
    command = [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
               str(tmp_path), target, "--cores", "1", "--configfile", str(path)]
    first = subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    # the eval task's data disappears once the training finished, before scoring reads it
    # (the scoring job's process start alone takes seconds)
    deadline = time.monotonic() + 300
    while not (run_dir / "train.json").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
        time.sleep(0.02)
    data.rename(data.with_suffix(".away"))
    # the snakemake working in the out_dir holds its lock, and names itself in it
    assert read_holder(tmp_path / "out")["pid"] == first.pid
    output = first.communicate(timeout=300)[0]
    assert first.returncode != 0, output[-3000:]
    score_log = (tmp_path / "out" / "logs" / "evaluate" / f"{run_id}.log").read_text()
    assert "extra.jsonl" in score_log, score_log[-2000:]
    # the failed job was the scoring one: the finished training is all there
    assert not (run_dir / "metrics.json").exists()
    kept = {name: _state(run_dir / name)
            for name in ("train.json", "train_log.jsonl", "adapter/adapter.safetensors")}
    train_log = (tmp_path / "out" / "logs" / "train" / f"{run_id}.log").read_text()

    # the data is back: the next run only scores (a dry run lists the same jobs:
    # test_recovery.py::test_16_4)
    data.with_suffix(".away").rename(data)
    redo = snakemake([target, "--cores", "1", "--configfile", str(path)], tmp_path)
    assert redo.returncode == 0, (redo.stdout + redo.stderr)[-3000:]
    assert planned_jobs(redo.stdout + redo.stderr) == {"evaluate": 1}
    assert {name: _state(run_dir / name) for name in kept} == kept  # not retrained, not touched
    assert (tmp_path / "out" / "logs" / "train" / f"{run_id}.log").read_text() == train_log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["run_id"] == run_id and "extra_qa" in json.dumps(metrics["extra_tasks"])
    # the lock went with the snakemake that held it
    assert acquire(tmp_path / "out", "test")
    release(tmp_path / "out")


@pytest.mark.slow
def test_check_loads_every_eval_tasks_data_and_names_what_fails(tmp_path, capsys, monkeypatch):
    data, tasks = eval_task(tmp_path)
    path = eval_study(tmp_path, tasks)
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 0, out
    assert "ok  eval data: extra_qa (6 documents)" in out
    # the verdict is kept by what it read: unchanged data is not loaded again
    kept = sorted((tmp_path / ".cache" / "checks").glob("eval-data-*"))
    assert len(kept) == 2
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 0 and "ok  eval data: extra_qa (6 documents)" in out
    assert sorted((tmp_path / ".cache" / "checks").glob("eval-data-*")) == kept
    # the data file is gone: check and snakemake name the task and the reason, and a real run
    # stops before its first job (a dry run only warns: a login node may lack the datasets)
    data.unlink()
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2
    line = next(x for x in out.splitlines() if x.startswith("FAIL eval data:"))
    assert "task 'extra_qa' does not load its data: FileNotFoundError" in line and str(data) in line
    run = snakemake(["--cores", "1", "--configfile", str(path)], tmp_path)
    assert run.returncode != 0
    text = run.stdout + run.stderr
    assert "harness: warning (eval data): eval.tasks: task 'extra_qa' does not load its data" in text
    assert "the study cannot run; 1 check(s) failed:\n- eval data: eval.tasks: task 'extra_qa'" in text
    assert not (tmp_path / "out").exists()  # no job started, nothing written
    # an empty test split is refused too
    data.write_text("")
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2 and "FAIL eval data: eval.tasks: task 'extra_qa'" in out


def test_check_refuses_a_hub_dataset_missing_from_the_offline_cache(tmp_path, capsys, monkeypatch):
    """A task whose dataset comes from the hub (as the registry's do), offline and not in the
    local cache: named before any job, not after hours of training."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, tasks = eval_task(tmp_path, dataset_path="allenai/ai2_arc", dataset_name="ARC-Easy",
                         dataset_kwargs={"cache_dir": str(tmp_path / "empty_cache")})
    code, out, _ = cli(["check", "--config", eval_study(tmp_path, tasks)], capsys, monkeypatch, tmp_path)
    assert code == 2
    line = next(x for x in out.splitlines() if x.startswith("FAIL eval data:"))
    assert "task 'extra_qa' does not load its data" in line and "ai2_arc" in line, line


@pytest.mark.slow
def test_an_out_dir_in_use_is_refused_from_another_checkout_and_nothing_is_deleted(tmp_path, capsys, monkeypatch):
    out_dir = tmp_path / "shared" / "out"
    path = study_config(tmp_path, out_dir=str(out_dir), methods=["smora", "lora"],
                        train__steps=3, train__checkpoint_every=0)
    ids = run_ids(path, tmp_path)
    first_run, second_run = ids[:2]
    for args in (["data", "--config", path], ["train", "--config", path, "--run", first_run, "--quiet"]):
        code, _, err = cli(args, capsys, monkeypatch, tmp_path)
        assert code == 0, err
    metrics = out_dir / "runs" / first_run / "metrics.json"
    before = _state(metrics)
    # another process works in the out_dir (as a snakemake of another checkout would)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from harness.common.lock import acquire; "
         f"acquire({str(out_dir)!r}, 'snakemake in another checkout'); print('held', flush=True); "
         "sys.stdin.read()"],
        cwd=ROOT, env=env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        checkout = tmp_path / "checkout_b"
        checkout.mkdir()
        # a dry run takes no lock: it shows what would run
        dry = snakemake(["-n", "--cores", "1", "--configfile", str(path)], checkout)
        assert dry.returncode == 0, (dry.stdout + dry.stderr)[-3000:]
        assert planned_jobs(dry.stdout + dry.stderr)["train"] == len(ids) - 1
        # the real run refuses before any job, naming the lock and its holder
        refused = snakemake(["--cores", "1", "--configfile", str(path)], checkout)
        text = refused.stdout + refused.stderr
        assert refused.returncode != 0
        assert f"{out_dir / '.lock'}" in text and f"process {holder.pid}" in text, text[-3000:]
        assert "snakemake in another checkout" in text
        assert _state(metrics) == before
        assert not (out_dir / "runs" / second_run).exists() and not (out_dir / "logs").exists()
        # so does a command run by hand
        code, _, err = cli(["train", "--config", path, "--run", second_run, "--quiet"], capsys, monkeypatch, tmp_path)
        assert code == 2 and f"is locked ({out_dir / '.lock'}) by process {holder.pid}" in err, err
        assert not (out_dir / "runs" / second_run).exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # the holder is gone, and with it the lock (the kernel releases it): work goes on
    assert acquire(out_dir, "test")
    assert read_holder(out_dir)["pid"] == os.getpid()
    release(out_dir)
    assert read_holder(out_dir) == {}
