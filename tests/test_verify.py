"""Issue 31, points 2, 3 and 5: every file a job reads is verified against the digest its
writer recorded, every result is validated before it counts as done (anything else is named,
set aside and redone), and the code that produced a run's numbers is recorded: a changed
method or toolkit makes its runs stale, built-in or plugin; changed engine code is flagged.

One tiny study is trained and scored by Snakemake once for the module; each test damages a
copy of its folder."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from tests.conftest import TINY_STUDY_MODEL as TINY
from tests.studies import cli, planned_jobs, snakemake

ROOT = Path(__file__).resolve().parent.parent


def _config(folder: Path) -> Path:
    config = {
        "study": "verify",
        "out_dir": "out",
        "model": TINY,
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": ["smora"],
        # 6 tasks x 8 training items: 48 lines; 6 test items a task
        "data": {"source": "generated", "train_per_task": 8, "test_per_task": 6},
        "train": {"seeds": [0], "steps": 3, "batch_size": 4, "checkpoint_every": 0},
        "eval": {"include_base": False},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The tiny study's data, its run trained and scored and its summary, by the commands
    the Snakefile's rules call (in-process): its folder."""
    from harness.cli.main import main

    folder = tmp_path_factory.mktemp("verify")
    path = _config(folder)
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        from harness.plan.config import load_config
        from harness.plan.study import plan_study

        (run,) = plan_study(load_config(path)).runs
        for args in (["data"], ["train", "--run", run.run_id, "--quiet"], ["summary"]):
            assert main([args[0], "--config", str(path), *args[1:]]) == 0, args
    finally:
        os.chdir(cwd)
    return folder


@pytest.fixture
def study(finished, tmp_path, monkeypatch):
    """A copy of the finished study: ``(folder, config path, plan, run)``, cwd the folder."""
    from harness.plan.config import load_config
    from harness.plan.study import plan_study

    shutil.copytree(finished / "out", tmp_path / "out", symlinks=True)
    for path in (tmp_path / "out").rglob("*"):  # the protected results of the original
        if path.is_file():
            path.chmod(0o644)
    path = _config(tmp_path)
    monkeypatch.chdir(tmp_path)
    plan = plan_study(load_config(path))
    (run,) = plan.runs
    return tmp_path, path, plan, run


def _status(path, capsys, monkeypatch, folder) -> str:
    code, out, err = cli(["status", "--config", path], capsys, monkeypatch, folder)
    assert code == 0, err
    return out


def _sha(path: Path) -> str:
    from harness.common.manifest import sha256_file

    return sha256_file(path)


def _rerecord(run_dir: Path, name: str) -> None:
    """What a writer that produced a bad file would leave: the file and a matching record."""
    from harness.common.manifest import record_files

    record_files(run_dir, [name])


# -- 2. inputs are verified -------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["flip one label", "cut to 4 lines"])
def test_a_damaged_test_file_is_named_never_scored_and_written_again(study, capsys, monkeypatch, damage):
    from harness.plan.status import invalid_data_summary

    folder, path, plan, run = study
    data_dir = folder / "out" / "data"
    test_file = data_dir / "tasks" / "data" / "animal.jsonl"
    recorded = _sha(test_file)
    lines = test_file.read_text().splitlines()
    if damage == "flip one label":
        item = json.loads(lines[0])
        item["label"] = (item["label"] + 1) % len(item["choices"])
        lines[0] = json.dumps(item)
    else:
        assert len(lines) == 6
        lines = lines[:4]
    test_file.write_text("\n".join(lines) + "\n")
    found = _sha(test_file)
    assert found != recorded

    # status names the file, both digests and the run it affects
    out = _status(path, capsys, monkeypatch, folder)
    assert "data/tasks/data/animal.jsonl" in out and recorded in out and found in out
    assert run.run_id in out and "corrupt" in out
    summary, why, _ = invalid_data_summary(plan.config, plan)
    assert (summary.name, why) == ("data_summary.json", "corrupt")

    # scoring refuses to use it (the message names the file and both digests)
    (plan.run_dir(run) / "metrics.json").unlink()
    code, _, err = cli(["evaluate", "--config", path, "--run", run.run_id, "--quiet"], capsys, monkeypatch, folder)
    assert code == 2
    assert "animal.jsonl" in err and recorded in err and found in err and f"run {run.run_id}" in err
    assert not (plan.run_dir(run) / "metrics.json").exists()

    # the data step writes the folder again from the config: the recorded bytes come back
    assert cli(["data", "--config", path], capsys, monkeypatch, folder)[0] == 0
    assert _sha(test_file) == recorded
    assert invalid_data_summary(plan.config, plan) is None


def test_a_training_file_cut_to_30_lines_is_never_trained_on(study, capsys, monkeypatch):
    from harness.plan.status import invalid_data_summary

    folder, path, plan, run = study
    train_file = folder / "out" / "data" / "train.jsonl"
    recorded = _sha(train_file)
    lines = train_file.read_text().splitlines()
    assert len(lines) == 48
    train_file.write_text("\n".join(lines[:30]) + "\n")
    found = _sha(train_file)
    detail = invalid_data_summary(plan.config, plan)[2]
    assert f"data/train.jsonl: recorded sha256 {recorded}, found {found}" in detail
    assert run.run_id in detail
    # a run that would train now refuses before its first step
    run_dir = plan.run_dir(run)
    for name in ("train.json", "metrics.json"):
        (run_dir / name).unlink()
    code, _, err = cli(["train", "--config", path, "--run", run.run_id, "--quiet"], capsys, monkeypatch, folder)
    assert code == 2
    assert "train.jsonl" in err and recorded in err and found in err
    assert not (run_dir / "train.json").exists()


def test_a_run_records_the_digests_of_what_it_read_and_a_changed_record_makes_it_stale(study):
    from harness.common.manifest import record_tree
    from harness.plan.status import invalid_files

    folder, _path, plan, run = study
    run_dir, data_dir = plan.run_dir(run), folder / "out" / "data"
    train = json.loads((run_dir / "train.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert train["inputs"]["data/train.jsonl"] == _sha(data_dir / "train.jsonl")
    assert metrics["inputs"]["data"]["data/tasks/data/animal.jsonl"] == _sha(data_dir / "tasks/data/animal.jsonl")
    assert invalid_files(plan, run) == []
    # other data, consistently recorded by a data step (e.g. copied in from elsewhere)
    test_file = data_dir / "tasks" / "data" / "animal.jsonl"
    test_file.write_text(test_file.read_text().replace('"label": 0', '"label": 1', 1))
    record_tree(data_dir, ["train.jsonl", "data_summary.json"], ["tasks"])
    ((file, why, detail),) = invalid_files(plan, run)
    assert (file.name, why) == ("metrics.json", "stale")
    assert detail.startswith("scored on data/tasks/data/animal.jsonl with sha256 ")


# -- 3. results are validated -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["metrics.json", "train.json"])
def test_an_empty_result_is_not_done_status_names_it_and_snakemake_redoes_it(study, capsys, monkeypatch, name):
    from harness.cli.snakefile import every_set_aside_of, redo_inputs_of
    from harness.plan.status import aside_name, invalid_files

    folder, path, plan, run = study
    run_dir = plan.run_dir(run)
    (run_dir / name).write_text("{}")
    _rerecord(run_dir, name)  # the manifest agrees: the schema alone must catch it
    invalid = {f.name: (why, detail) for f, why, detail in invalid_files(plan, run)}
    assert invalid[name][0] == "corrupt"
    assert invalid[name][1].startswith(f"{name} lacks required field(s) run_id, method, variant")
    out = _status(path, capsys, monkeypatch, folder)
    assert "corrupt" in out and f"{name} lacks required field(s)" in out
    # what the Snakefile asks for: the set-aside name, as an input of the job that redoes it
    # (the DAG this gives is checked end to end in tests/test_recovery.py, test_16_4)
    aside = str(aside_name(run_dir / name, "corrupt"))
    assert aside in every_set_aside_of(plan.config, plan)(SimpleNamespace())
    stage = "train" if name == "train.json" else "score"
    assert aside in redo_inputs_of(plan, stage)(SimpleNamespace(run=run.run_id))


def test_per_item_scores_cut_short_are_named_and_redone(study, capsys, monkeypatch):
    from harness.plan.status import invalid_files

    folder, path, plan, run = study
    run_dir = plan.run_dir(run)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["items"]["color"]["acc"] = metrics["items"]["color"]["acc"][:3]
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    _rerecord(run_dir, "metrics.json")
    ((file, why, detail),) = invalid_files(plan, run)
    assert (file.name, why) == ("metrics.json", "corrupt")
    assert detail == "metrics.json holds 3 per-item acc scores of task 'color', its test set has 6 items"
    assert "per-item acc scores of task 'color'" in _status(path, capsys, monkeypatch, folder)


def test_a_result_edited_after_it_was_written_differs_from_its_manifest(study):
    from harness.plan.status import invalid_files

    _folder, _path, plan, run = study
    run_dir = plan.run_dir(run)
    recorded = _sha(run_dir / "metrics.json")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["suite_acc"] = 0.99
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    ((file, why, detail),) = invalid_files(plan, run)
    assert (file.name, why) == ("metrics.json", "corrupt")
    assert f"recorded sha256 {recorded}, found sha256 {_sha(run_dir / 'metrics.json')}" in detail


def test_a_truncated_summary_is_rebuilt_a_damaged_data_file_rewritten_and_nothing_retrained(
        study, capsys, monkeypatch):
    from harness.plan.status import invalid_outputs

    folder, path, plan, run = study
    summary = folder / "out" / "summary.csv"
    assert invalid_outputs(plan) == []
    summary.write_text(summary.read_text().splitlines()[0] + "\n")  # the header alone
    ((file, why, detail),) = invalid_outputs(plan)
    assert (file, why) == (Path("out/summary.csv"), "corrupt") and "recorded sha256" in detail
    test_file = folder / "out" / "data" / "tasks" / "data" / "color.jsonl"
    test_file.write_text(test_file.read_text().splitlines()[0] + "\n")
    # one dry run: both are moved aside, the data step and the summary run again; the run
    # (trained and scored on the recorded bytes) is neither retrained nor scored again
    dry = snakemake(["-n", "--cores", "1", "--configfile", str(path)], folder)
    planned = planned_jobs(dry.stdout + dry.stderr)
    assert planned.get("set_aside") == 2 and planned.get("summary") == 1 and planned.get("data") == 1, (
        dry.stdout[-3000:])
    assert not set(planned) & {"train", "score", "evaluate"}, planned
    assert "out/summary.csv.corrupt-" in dry.stdout and "out/data/data_summary.json.corrupt-" in dry.stdout
    # a folder written before manifests: the rows are checked against the study's runs
    (folder / "out" / "manifest.json").unlink()
    ((file, why, detail),) = invalid_outputs(plan)
    assert detail.startswith("summary.csv lists 0 row(s), the study has 1 run(s)")
    # the summary never reads an invalid result
    (plan.run_dir(run) / "metrics.json").write_text("{}")
    code, _, err = cli(["summary", "--config", path], capsys, monkeypatch, folder)
    assert code == 2 and "metrics.json lacks required field(s)" in err


# -- 5. code identity ---------------------------------------------------------------------------


def _rewrite_train(run_dir: Path, edit) -> None:
    train = json.loads((run_dir / "train.json").read_text())
    edit(train)
    (run_dir / "train.json").write_text(json.dumps(train))
    _rerecord(run_dir, "train.json")


def test_a_built_in_method_whose_code_changed_is_stale_like_a_plugin(study, capsys, monkeypatch):
    from harness.plan.status import invalid_files

    folder, path, plan, run = study
    assert run.method_source["builtin"] and run.method_source["files"] == ["methods/smora.py"]
    _rewrite_train(plan.run_dir(run), lambda t: t["method_source"].update(digest="0123456789abcdef"))
    invalid = {f.name: (why, detail) for f, why, detail in invalid_files(plan, run)}
    assert invalid["train.json"] == ("stale", "the code of method 'smora' changed since it trained (methods/smora.py)")
    assert invalid["metrics.json"][0] == "orphan"  # scored again after the retraining
    assert "stale" in _status(path, capsys, monkeypatch, folder)


def test_a_changed_toolkit_makes_runs_stale(study):
    from harness.plan.status import invalid_files
    from harness.plan.study import code_identity

    _folder, _path, plan, run = study
    _rewrite_train(plan.run_dir(run), lambda t: t["code"]["toolkit"].update(digest="0123456789abcdef"))
    invalid = {f.name: (why, detail) for f, why, detail in invalid_files(plan, run)}
    now = code_identity()["toolkit"]["digest"]
    assert invalid["train.json"] == (
        "stale", f"the toolkit harness.adapters changed since it trained (recorded 0123456789abcdef, now {now})")


def test_changed_engine_code_is_recorded_and_flagged_not_redone(study, capsys, monkeypatch):
    from harness.plan.status import invalid_files
    from harness.plan.study import ENGINE_MODULES, code_identity

    folder, path, plan, run = study
    train = json.loads((plan.run_dir(run) / "train.json").read_text())
    assert train["code"] == code_identity()
    assert sorted(train["code"]["engine"]["files"]) == sorted(f"harness/{m}" for m in ENGINE_MODULES)
    _rewrite_train(plan.run_dir(run), lambda t: t["code"]["engine"]["files"].update(
        {"harness/run/train.py": "0123456789abcdef"}))
    assert invalid_files(plan, run) == []
    out = _status(path, capsys, monkeypatch, folder)
    assert "flagged" in out and "trained under other engine code than this checkout's (harness/run/train.py)" in out


def test_a_run_from_before_code_identity_is_flagged_and_a_declared_change_is_not_stale(study, capsys, monkeypatch, tmp_path):
    from harness.plan import study as study_module
    from harness.plan.status import invalid_files

    folder, path, plan, run = study
    _rewrite_train(plan.run_dir(run), lambda t: t.pop("code"))
    assert invalid_files(plan, run) == []
    out = _status(path, capsys, monkeypatch, folder)
    assert "trained before the harness recorded its toolkit and engine code (not checked)" in out
    # an older method digest, declared number-preserving for today's: flagged, with the reason
    _rewrite_train(plan.run_dir(run), lambda t: t["method_source"].update(digest="0123456789abcdef"))
    declared = tmp_path / "number_preserving.yaml"
    declared.write_text(yaml.safe_dump({"method": {"smora": {
        "to": run.method_source["digest"], "from": ["0123456789abcdef"], "why": "renamed a variable"}}}))
    monkeypatch.setattr(study_module, "NUMBER_PRESERVING", declared)
    assert invalid_files(plan, run) == []
    assert "declared number-preserving: renamed a variable" in _status(path, capsys, monkeypatch, folder)
    # the declaration lapses when the code changes again
    declared.write_text(declared.read_text().replace(run.method_source["digest"], "fedcba9876543210"))
    assert next(why for _, why, _ in invalid_files(plan, run)) == "stale"


def test_a_plugin_subclassing_a_built_in_brings_the_built_ins_file():
    from harness.adapters import get_method, load_plugin
    from harness.plan.study import method_source

    load_plugin("examples.smora_paper_rate")
    name = next(n for n in ("smora_paper", "smora_paper_rate") if _registered(n))
    source = method_source(get_method(name))
    assert "methods/smora.py" in source["files"] and not source["builtin"]


def _registered(name: str) -> bool:
    from harness.adapters import get_method

    try:
        get_method(name)
        return True
    except Exception:
        return False
