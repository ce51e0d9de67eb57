"""Nothing computed is lost (issues 7 and 16): a NaN loss stops its run and the sweep goes
on, a killed run resumes exactly from its checkpoint, writes are atomic (also on a full
disk), a run without weights is restored, a lost, corrupt or stale result is redone by
exactly the jobs a dry run lists, and an edited training line reruns exactly its runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.studies import (
    ROOT,
    cli,
    env,
    file_tree,
    harness,
    jsonl_study,
    planned_jobs,
    run_ids,
    snakemake,
    strip_volatile,
    study_config,
    suite_items,
)

# -- 7. NaN loss -----------------------------------------------------------------------------


NAN_PLUGIN = '''
from harness.adapters import register
from methods.molora import MoLoRA, MoLoRALayer


class NanAfterFour(MoLoRALayer):
    """A buggy method: its adapter output turns into NaN from the 5th training forward on."""

    calls = 0

    def delta(self, x):
        out = super().delta(x)
        if self.training:
            type(self).calls += 1
            if type(self).calls > 4 * 7:
                out = out * float("nan")
        return out


@register
class NanMethod(MoLoRA):
    name = "nan_after_four"
    description = "diverges on purpose (reliability test)"
    layer_cls = NanAfterFour
'''


def test_7_nan_loss_stops_the_run_and_the_rest_of_the_sweep_goes_on(tmp_path):
    (tmp_path / "nan_plugin.py").write_text(NAN_PLUGIN)
    path = study_config(tmp_path, plugins=["nan_plugin"], methods=["molora", "nan_after_four"])
    ids = run_ids(path, tmp_path)
    bad = next(i for i in ids if i.startswith("nan_after_four"))
    good = next(i for i in ids if i.startswith("molora"))

    missing_data = harness(["train", "--config", str(path), "--run", bad], tmp_path, tmp_path)
    assert missing_data.returncode == 2
    assert (
        "out/data/train.jsonl: file not found; write the study's data first" in missing_data.stderr
    )
    assert harness(["data", "--config", str(path)], tmp_path).returncode == 0
    direct = harness(["train", "--config", str(path), "--run", bad, "--quiet"], tmp_path, tmp_path)
    assert direct.returncode == 2
    assert f"run {bad}: the loss became nan at step 4" in direct.stderr
    assert f"(run folder out/runs/{bad})" in direct.stderr
    assert "last finite loss: " in direct.stderr and "last finite loss: None" not in direct.stderr

    result = snakemake(["--cores", "2", "--configfile", str(path)], tmp_path, tmp_path)
    assert result.returncode != 0  # the sweep as a whole reports the failure
    runs = tmp_path / "out" / "runs"
    assert (runs / good / "metrics.json").exists()  # --keep-going: the healthy run finished
    assert not (runs / bad / "train.json").exists()
    assert not (runs / bad / "metrics.json").exists()
    # snakemake resumed the failed run from its step-3 checkpoint and it diverged again
    log = (tmp_path / "out" / "logs" / "train" / f"{bad}.log").read_text()
    assert f"error: run {bad}: the loss became nan at step" in log
    assert "No metrics were written" in log


# -- 8. SIGKILL and resume -------------------------------------------------------------------


def test_8_a_killed_run_resumes_from_its_checkpoint_with_identical_results(tmp_path):
    steps = 60
    config = {"train__steps": steps, "train__checkpoint_every": 5}
    killed_dir, clean_dir = tmp_path / "killed", tmp_path / "clean"
    killed_dir.mkdir()
    clean_dir.mkdir()
    killed_cfg = study_config(killed_dir, **config)
    clean_cfg = study_config(clean_dir, **config)
    run_id = run_ids(killed_cfg, killed_dir)[0]
    assert run_ids(clean_cfg, clean_dir)[0] == run_id

    for cwd, cfg in ((killed_dir, killed_cfg), (clean_dir, clean_cfg)):
        assert harness(["data", "--config", str(cfg)], cwd).returncode == 0

    state = killed_dir / "out" / "runs" / run_id / "checkpoints" / "last" / "state.json"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "harness",
            "train",
            "--config",
            str(killed_cfg),
            "--run",
            run_id,
            "--quiet",
        ],
        cwd=killed_dir,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not state.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_dir / "out" / "runs" / run_id / "train.json").exists()

    # the next snakemake call finishes the killed run from its checkpoint
    target = f"out/runs/{run_id}/metrics.json"
    resumed = snakemake([target, "--cores", "1", "--configfile", str(killed_cfg)], killed_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the resume is said in snakemake's own output, not only in the job's log
    assert f"resumed {run_id} from step " in resumed.stdout + resumed.stderr
    clean = snakemake([target, "--cores", "1", "--configfile", str(clean_cfg)], clean_dir)
    assert clean.returncode == 0, clean.stderr[-3000:]

    killed_run, clean_run = (
        killed_dir / "out" / "runs" / run_id,
        clean_dir / "out" / "runs" / run_id,
    )
    killed_summary = json.loads((killed_run / "train.json").read_text())
    assert killed_summary["resumed_from_step"] > 0
    assert json.loads((clean_run / "train.json").read_text())["resumed_from_step"] is None

    def losses(run):
        return [
            (r["step"], r["loss"])
            for r in map(json.loads, (run / "train_log.jsonl").read_text().splitlines())
        ]

    assert losses(killed_run) == losses(clean_run)
    assert len(losses(killed_run)) == steps
    assert strip_volatile(json.loads((killed_run / "metrics.json").read_text())) == strip_volatile(
        json.loads((clean_run / "metrics.json").read_text())
    )
    assert not (killed_run / "checkpoints").exists()


# -- 9. atomic writes ------------------------------------------------------------------------


def test_9_an_interrupted_write_leaves_the_previous_file_intact(tmp_path):
    from harness.common.files import atomic_write_json

    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"suite_acc": 0.5})

    circular: dict = {"suite_acc": 0.7}
    circular["self"] = circular  # fails half-way through serialisation
    with pytest.raises(ValueError, match="Circular reference"):
        atomic_write_json(target, circular)
    assert json.loads(target.read_text()) == {"suite_acc": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_9_result_writers_go_through_the_atomic_helpers():
    sources = {p.name: p.read_text() for p in (ROOT / "harness").rglob("*.py")}
    for name in ("train.py", "evaluate.py", "summary.py", "tables.py"):
        text = sources[name]
        assert "atomic_write" in text, name
        assert ".write_text(" not in text and "json.dump(" not in text, name



@pytest.fixture
def trained_tiny(tmp_path, capsys, monkeypatch):
    """A one-run study trained (not scored) in-process: ``(config path, run id)``."""
    path = study_config(tmp_path, train__steps=4, train__checkpoint_every=0)
    (run_id,) = run_ids(path, tmp_path)
    for args in (["data", "--config", path], ["train", "--config", path, "--run", run_id, "--quiet", "--no-score"]):
        code, _, err = cli(args, capsys, monkeypatch, tmp_path)
        assert code == 0, err
    return path, run_id


def test_16_3_evaluating_a_run_without_weights_says_how_to_restore_them_and_that_works(
    trained_tiny, tmp_path, capsys, monkeypatch
):
    import shutil

    path, run_id = trained_tiny
    run_dir = tmp_path / "out" / "runs" / run_id
    shutil.rmtree(run_dir / "adapter")  # as after a fresh clone: weights are never committed
    code, _, err = cli(["evaluate", "--config", path, "--run", run_id], capsys, monkeypatch, tmp_path)
    assert code == 2 and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1
    assert "adapter/adapter.safetensors is missing" in err and "python -m harness restore" in err
    # the advice, followed, works: the same losses at every step, then the evaluation runs
    code, out, err = cli(["restore", "--config", path, "--run", str(run_dir)], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert f"{run_id}: weights restored (4 steps retrained, identical losses at every step)" in out
    record = json.loads((run_dir / "restore.json").read_text())
    assert record["identical_losses"] and record["max_abs_loss_diff"] == 0.0
    # --run takes the run's folder as well as its id
    code, out, err = cli(["evaluate", "--config", path, "--run", f"out/runs/{run_id}/", "--quiet"],
                         capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert out.startswith(f"{run_id}: suite acc ")


def test_16_3_train_scores_a_trained_run_without_retraining_it(trained_tiny, tmp_path, capsys, monkeypatch):
    """The train job of a run whose training finished but whose scores are missing (what
    the Snakefile schedules when a metrics.json is lost) scores it and leaves the training
    as it was; without its weights (a fresh clone) it restores them first."""
    import shutil

    path, run_id = trained_tiny
    run_dir = tmp_path / "out" / "runs" / run_id
    before = (run_dir / "train.json").read_bytes(), (run_dir / "train_log.jsonl").read_bytes()
    shutil.rmtree(run_dir / "adapter")
    code, out, err = cli(["train", "--config", path, "--run", run_id, "--quiet"], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert f"{run_id}: weights restored (4 steps retrained, identical losses at every step)" in out
    assert f"{run_id}: already trained" in out and f"{run_id}: suite score " in out
    assert ((run_dir / "train.json").read_bytes(), (run_dir / "train_log.jsonl").read_bytes()) == before
    assert json.loads((run_dir / "metrics.json").read_text())["run_id"] == run_id


def test_16_4_a_lost_or_corrupt_result_is_redone_by_the_next_snakemake_and_a_moved_config_redoes_nothing(tmp_path, capsys, monkeypatch):
    """A dry run lists exactly the jobs the real run runs, and reading the Snakefile changes
    nothing: a deleted metrics.json is one evaluate job (scoring only: the training is kept),
    a corrupt one a set_aside job and that evaluate job."""
    path = study_config(tmp_path, train__steps=3, train__checkpoint_every=0)
    done = snakemake(["--cores", "2", "--configfile", str(path)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    (run_id,) = run_ids(path, tmp_path)
    run_dir = tmp_path / "out" / "runs" / run_id
    metrics = run_dir / "metrics.json"
    metrics.chmod(0o644)
    metrics.unlink()
    code, out, _ = cli(["status", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 0 and "missing" in out and "trained, not evaluated" in out
    assert f"python -m harness evaluate --config {path} --run {run_id}" in out
    # the dry run names the job and changes nothing; the real run runs exactly that
    before = file_tree(tmp_path / "out")
    dry = snakemake(["-n", "--cores", "1", "--configfile", str(path)], tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    planned = planned_jobs(dry.stdout + dry.stderr)
    assert planned == {"evaluate": 1, "figures": 1, "summary": 1, "tables": 1, "all": 1}, dry.stdout[-3000:]
    assert f"run={run_id}" in dry.stdout + dry.stderr
    assert file_tree(tmp_path / "out") == before
    redo = snakemake(["--cores", "1", "--configfile", str(path)], tmp_path)
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert planned_jobs(redo.stdout + redo.stderr) == planned
    train_log = (tmp_path / "out" / "logs" / "train" / f"{run_id}.log").read_text()
    assert "suite score" not in train_log  # the train job trained only
    log = (tmp_path / "out" / "logs" / "evaluate" / f"{run_id}.log").read_text()
    assert f"{run_id}: suite acc " in log  # scored again, not retrained
    assert json.loads(metrics.read_text())["run_id"] == run_id
    again = snakemake(["-n", "--cores", "1", "--configfile", str(path)], tmp_path)
    assert "Nothing to be done" in again.stdout + again.stderr

    # a half-written file (a crash outside the atomic writers): named, moved aside, redone
    metrics.chmod(0o644)
    metrics.write_text('{"run_id": "' + run_id + '", "suite_a')
    code, out, _ = cli(["status", "--config", path], capsys, monkeypatch, tmp_path)
    assert "corrupt" in out and "metrics.json: not valid JSON" in out
    before = file_tree(tmp_path / "out")
    dry = snakemake(["-n", "--cores", "1", "--configfile", str(path)], tmp_path)
    planned = planned_jobs(dry.stdout + dry.stderr)
    assert planned == {"set_aside": 1, "evaluate": 1, "figures": 1, "summary": 1, "tables": 1, "all": 1}
    assert f"out/runs/{run_id}/metrics.json.corrupt-" in dry.stdout
    assert file_tree(tmp_path / "out") == before  # a dry run moves nothing
    redo = snakemake(["--cores", "1", "--configfile", str(path)], tmp_path)
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert planned_jobs(redo.stdout + redo.stderr) == planned
    assert json.loads(metrics.read_text())["run_id"] == run_id  # evaluated again
    (kept,) = run_dir.glob("metrics.json.corrupt-*")  # the broken file is kept, not deleted
    assert kept.read_text() == '{"run_id": "' + run_id + '", "suite_a'

    # issue 16.8 on the same finished study (one DAG run less): moving the config file redoes nothing
    moved = tmp_path / "elsewhere" / "renamed.yaml"
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    dry = snakemake(["-n", "--cores", "1", "--configfile", str(moved)], tmp_path)
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-2000:]


def test_16_7_an_edited_training_line_reruns_exactly_the_runs_that_read_it(tmp_path):
    train, test = suite_items(("color", "animal"), n=8)
    path = jsonl_study(tmp_path, train, test, methods=["smora", "moa"],
                       budget={"total_rank": 4, "active_rank": 2, "granularities": [2]})
    before_runs = run_ids(path, tmp_path)
    from harness.plan.config import load_config
    from harness.plan.study import plan_study

    before = {c.tasks[0]: c.run_id for c in plan_study(load_config(path)).components}
    # edit one line of task "color"
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if json.loads(line)["task"] == "color")
    item = json.loads(lines[index])
    item["question"] += " "
    lines[index] = json.dumps(item)
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    after_runs = run_ids(path, tmp_path)
    after = {c.tasks[0]: c.run_id for c in plan_study(load_config(path)).components}
    assert after["animal"] == before["animal"]  # its task's items are unchanged
    assert after["color"] != before["color"]
    trained = [r for r in before_runs if not r.startswith("base")]
    assert not set(trained) & set(after_runs)  # every joint run read the edited line
    # a test line: no run id changes (training read nothing new); results become stale
    test_text = (tmp_path / "test.jsonl").read_text()
    (tmp_path / "test.jsonl").write_text(test_text.replace("Words:", "Words: ", 1))
    assert run_ids(path, tmp_path) == after_runs


def test_16_7_a_stale_evaluation_is_moved_aside_and_redone(trained_tiny, tmp_path, capsys, monkeypatch):
    from harness.common.manifest import record_files
    from harness.plan.config import load_config
    from harness.plan.status import aside_name, invalid_files
    from harness.plan.study import plan_study

    path, run_id = trained_tiny
    assert cli(["evaluate", "--config", path, "--run", run_id, "--quiet"], capsys, monkeypatch, tmp_path)[0] == 0
    metrics = tmp_path / "out" / "runs" / run_id / "metrics.json"
    data = json.loads(metrics.read_text())
    data["test_data"] = "an older test set"
    metrics.chmod(0o644)
    metrics.write_text(json.dumps(data))
    record_files(metrics.parent, ["metrics.json"])  # as scoring on the older test set recorded it
    _, out, _ = cli(["status", "--config", path], capsys, monkeypatch, tmp_path)
    assert "stale" in out and "scored on test data that has changed since" in out
    monkeypatch.chdir(tmp_path)
    plan = plan_study(load_config(path))
    ((found, why, _),) = invalid_files(plan, plan.run(run_id))
    assert (found.resolve(), why) == (metrics.resolve(), "stale")
    target = aside_name(found, why)
    code, out, err = cli(["set-aside", "--file", str(found), "--to", str(target)], capsys, monkeypatch, tmp_path)
    assert code == 0, err
    assert not metrics.exists() and json.loads(target.read_text())["test_data"] == "an older test set"
    assert invalid_files(plan, plan.run(run_id)) == []


def test_16_a_full_disk_during_a_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import errno

    from harness.common.files import atomic_write_json

    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"suite_acc": 0.5})

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left on device"):
        atomic_write_json(target, {"suite_acc": 0.9})
    assert json.loads(target.read_text()) == {"suite_acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


