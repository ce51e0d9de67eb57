"""Reliability (issue 7): bad input is refused early and clearly, interrupted runs resume
exactly, results are never half-written or overwritten, and reruns are reproducible.

Numbered as in the issue. Points 2, 3 and 6 are also covered at the API level in
test_plugins.py and test_budget.py; here they are checked through the CLI a user runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


# -- 1. schema errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "fragments"),
    [
        ({"train__lr_rate": 0.1}, ["unknown key(s) 'lr_rate' in train", "allowed keys:", "lr,"]),
        ({"train__steps": "many"}, ["train.steps = 'many'", "expected ['integer', 'null']"]),
        (
            {"budget__router": "shared"},
            ["budget.router = 'shared'", "valid values: separate, counted"],
        ),
        ({"train__batch_size": 0}, ["train.batch_size = 0 is out of range", "valid: >= 1"]),
        (
            {"methods": ["smora", {"name": "sira", "opts": {}}]},
            ["unknown key(s) 'opts' (did you mean 'options'?) in methods[1]"],
        ),
    ],
)
def test_1_schema_errors_name_key_value_and_what_is_allowed(tmp_path, override, fragments):
    from harness.plan.config import ConfigError, load_config

    path = study_config(tmp_path, **override)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: ")
    for fragment in fragments:
        assert fragment in message


def test_1_snakemake_refuses_a_bad_config_before_any_job(tmp_path):
    path = study_config(tmp_path, budget__router="shared")
    result = snakemake(["-n", "--cores", "1", "--configfile", str(path)], tmp_path)
    assert result.returncode != 0
    assert (
        "budget.router = 'shared' is not allowed; valid values: separate, counted"
        in result.stdout + result.stderr
    )
    assert not (tmp_path / "out").exists()


# -- 2. unknown method, broken plugin --------------------------------------------------------


def test_2_unknown_method_and_broken_plugin_through_the_cli(tmp_path):
    unknown = harness(
        ["budget", "--config", str(study_config(tmp_path, methods=["smroa"]))], tmp_path
    )
    assert unknown.returncode == 2
    assert "smroa" in unknown.stderr
    for name in ("lora", "molora", "sira", "smora", "malora", "multilora"):
        assert name in unknown.stderr

    (tmp_path / "broken_plugin.py").write_text("import not_a_real_dependency\n")
    broken = harness(
        ["budget", "--config", str(study_config(tmp_path, plugins=["broken_plugin"]))],
        tmp_path,
        tmp_path,
    )
    assert broken.returncode == 2
    assert "broken_plugin" in broken.stderr
    assert "No module named 'not_a_real_dependency'" in broken.stderr


# -- 3. infeasible budget --------------------------------------------------------------------


def test_3_infeasible_budget_lists_the_nearest_feasible_values(tmp_path):
    path = study_config(tmp_path, budget={"total_rank": 4, "active_rank": 2, "granularities": [3]})
    result = harness(["budget", "--config", str(path)], tmp_path)
    assert result.returncode == 2
    assert "granularity 3 does not divide total_rank 4" in result.stderr
    assert "nearest" in result.stderr and "[2, 4]" in result.stderr
    assert "Traceback" not in result.stderr


# -- 4. malformed data file ------------------------------------------------------------------


def test_4_malformed_training_file_names_file_and_line(tmp_path):
    good = {"question": "2+2?", "choices": ["3", "4"], "label": 1, "task": "math"}
    train = tmp_path / "train.jsonl"
    train.write_text(json.dumps(good) + "\n" + json.dumps({**good, "label": 5}) + "\n")
    test = tmp_path / "test.jsonl"
    test.write_text(json.dumps(good) + "\n")
    path = study_config(tmp_path, data={"source": "jsonl", "train": str(train), "test": str(test)})
    result = harness(["data", "--config", str(path)], tmp_path)
    assert result.returncode == 2
    assert f"{train}:2: " in result.stderr
    assert "label" in result.stderr and "5" in result.stderr
    assert not (tmp_path / "out" / "data" / "train.jsonl").exists()

    train.write_text("")
    empty = harness(["data", "--config", str(path)], tmp_path)
    assert empty.returncode == 2
    assert str(train) in empty.stderr and "empty" in empty.stderr


# -- 5. missing base model -------------------------------------------------------------------


def test_5_missing_model_says_what_was_tried_and_how_to_fix_it(tmp_path):
    from harness.model.load import ModelSourceError, resolve_model

    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelSourceError) as error:
        resolve_model({"source": str(missing)}, tmp_path / "cache")
    message = str(error.value)
    assert str(missing) in message and "does not exist" in message
    assert "Hugging Face cache" in message and "local folder" in message

    config = study_config(tmp_path, model={**TINY, "source": "some-org/not-cached-7b"})
    result = harness(["train", "--config", str(config), "--run", "x"], tmp_path)
    assert result.returncode == 2
    assert "model.source 'some-org/not-cached-7b'" in result.stderr
    assert "Nothing is downloaded at run time" in result.stderr
    assert "hf download some-org/not-cached-7b" in result.stderr


# -- 6. plugin counts that disagree with its modules -----------------------------------------


LYING_PLUGIN = """
from harness.adapters import register
from methods.molora import MoLoRA


@register
class Lying(MoLoRA):
    name = "lying"
    description = "reports one parameter fewer than it builds"

    def count(self, config, shape):
        real = super().count(config, shape)
        return type(real)(total=real.total - 1, activated=real.activated, router=real.router)
"""


def test_6_plugin_with_wrong_counts_is_refused_with_both_numbers(tmp_path):
    import re

    (tmp_path / "lying_plugin.py").write_text(LYING_PLUGIN)
    path = study_config(tmp_path, plugins=["lying_plugin"], methods=["lying"])
    result = harness(["budget", "--config", str(path)], tmp_path, tmp_path)
    assert result.returncode == 1
    reported, real = map(
        lambda n: int(n.replace(",", "")),
        re.search(
            r"lying G2: the method reports total ([\d,]+) but its modules hold ([\d,]+)",
            result.stderr,
        ).groups(),
    )
    assert real == reported + 7  # one missing parameter per adapted module (7 in one layer)
    d, inter = 32, 64
    shapes = [(d, d), (d, 16), (d, 16), (d, d), (d, inter), (d, inter), (inter, d)]
    # MoLoRA G=2 of total rank 4: experts 2 x rank 2 plus a router of 2 x d_in per module
    assert real == sum(4 * (i + o) + 2 * i for i, o in shapes)


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


# -- 10-12. determinism, new folders, provenance ---------------------------------------------


@pytest.fixture(scope="module")
def two_identical_studies(tmp_path_factory):
    folders = []
    for name in ("first", "second"):
        folder = tmp_path_factory.mktemp(name)
        cfg = study_config(folder)
        result = snakemake(
            [metrics_target(cfg, folder), "--cores", "1", "--configfile", str(cfg)], folder
        )
        assert result.returncode == 0, result.stderr[-3000:]
        folders.append((folder, cfg))
    return folders


def test_10_same_config_and_seed_give_identical_metrics(two_identical_studies):
    (first, cfg), (second, _) = two_identical_studies
    run_id = run_ids(cfg, first)[0]
    a = json.loads((first / "out" / "runs" / run_id / "metrics.json").read_text())
    b = json.loads((second / "out" / "runs" / run_id / "metrics.json").read_text())
    assert strip_volatile(a) == strip_volatile(b)
    assert a["timing"] != {} and "provenance" in a


def test_11_changes_give_new_folders_and_nothing_is_overwritten(two_identical_studies, tmp_path):
    (folder, cfg), _ = two_identical_studies
    run_id = run_ids(cfg, folder)[0]
    run_dir = folder / "out" / "runs" / run_id
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    # an unchanged config does no work
    again = snakemake(
        [metrics_target(cfg, folder), "-n", "--cores", "1", "--configfile", str(cfg)], folder
    )
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr

    # effective settings change the folder name; execution-only ones do not
    changed = study_config(tmp_path, train__lr=0.002)
    assert run_ids(changed, tmp_path)[0] != run_id
    execution_only = study_config(tmp_path, train__checkpoint_every=7, train__threads=2)
    assert run_ids(execution_only, tmp_path)[0] == run_id

    # asking for a finished run again is refused, and the files stay byte-identical
    retrain = harness(["train", "--config", str(cfg), "--run", run_id], folder)
    assert retrain.returncode == 2
    assert f"{run_dir.relative_to(folder)}/metrics.json exists: this run is already trained and scored" in retrain.stderr
    assert "never overwritten" in retrain.stderr
    reeval = harness(["evaluate", "--config", str(cfg), "--run", run_id], folder)
    assert reeval.returncode == 2 and "metrics.json exists" in reeval.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_11_a_folder_holding_a_different_run_is_refused(tmp_path):
    from types import SimpleNamespace

    from harness.model.run_folder import RunFolderConflict, write_run_spec

    run = SimpleNamespace(
        run_id="x",
        method="lora",
        tag="r4",
        granularity=1,
        seed=0,
        method_config={},
        effective={"train": {"lr": 0.001}},
    )
    config = {"study": "s", "model": {}, "cache_dir": ".cache", "out_dir": "out"}
    write_run_spec(config, run, tmp_path)
    run.effective = {"train": {"lr": 0.002}}
    with pytest.raises(RunFolderConflict, match=r"train\.lr: stored 0\.001, now 0\.002"):
        write_run_spec(config, run, tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["effective_config"] == {
        "train": {"lr": 0.001}
    }


def test_12_every_run_folder_holds_what_is_needed_to_rerun_it(two_identical_studies):
    (folder, cfg), _ = two_identical_studies
    run_id = run_ids(cfg, folder)[0]
    run_dir = folder / "out" / "runs" / run_id
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["seed"] == 0 and spec["method"] == "smora"
    assert spec["effective_config"]["train"]["lr"] == 0.001
    assert spec["model"]["source"] == "tiny-random"
    for name in ("train.json", "metrics.json"):
        provenance = json.loads((run_dir / name).read_text())["provenance"]
        assert {"command", "versions", "git", "hardware", "time_utc"} <= set(provenance)
        assert provenance["versions"]["torch"].startswith("2.13.0")
        assert "commit" in provenance["git"]
        assert run_id in provenance["command"]


# == issue 16: what a new user meets =========================================================
#
# Each point of the issue, then more mistakes a researcher makes with a study config, a data
# file, a plugin or the command line; every one is refused with a message that names the
# file, field or value and what is valid, or handled without losing anything.


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


def test_16_1_bad_data_is_refused_before_any_job_by_snakemake_and_by_check(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    train[16 % len(train)] = {k: v for k, v in train[16 % len(train)].items() if k != "label"}
    bad_line = 16 % len(train) + 1
    path = jsonl_study(tmp_path, train, test, eval__tasks=["arc_esy"])
    dry = snakemake(["-n", "--cores", "1", "--configfile", str(path)], tmp_path)
    assert dry.returncode != 0
    assert f"train.jsonl:{bad_line}: missing field 'label'" in dry.stdout + dry.stderr
    assert not (tmp_path / "out").exists()  # no job started, nothing written
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2
    assert f"FAIL data: {tmp_path / 'train.jsonl'}:{bad_line}: missing field 'label'" in out
    # the registry check gives a "did you mean" for a typo in eval.tasks
    assert "FAIL lm-eval tasks: eval.tasks: lm-eval knows no task 'arc_esy' (did you mean arc_easy" in out
    assert "ok  model: tiny-random" in out
    assert out.rstrip().endswith("2 check(s) failed")
    # the budget command reads the data too (run ids hash it): the same message, no traceback
    code, _, err = cli(["budget", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2 and f"train.jsonl:{bad_line}: missing field 'label'" in err and "Traceback" not in err


def test_16_1_a_study_that_can_run_passes_every_check(tmp_path, capsys, monkeypatch):
    code, out, _ = cli(["check", "--config", study_config(tmp_path)], capsys, monkeypatch, tmp_path)
    assert code == 0, out
    for name in ("config", "data", "out_dir", "methods and budget", "batches", "model", "lengths"):
        assert f"ok  {name}: " in out
    assert out.rstrip().endswith("ready to run")


def test_16_2_a_plugin_with_its_own_bug_is_named_through_the_cli(tmp_path):
    (tmp_path / "buggy_plugin.py").write_text("CONFIG = {}\nRANK = CONFIG['rank']\n")
    result = harness(["budget", "--config", str(study_config(tmp_path, plugins=["buggy_plugin"]))],
                     tmp_path, tmp_path)
    assert result.returncode == 2
    assert "plugin 'buggy_plugin' raised KeyError: 'rank'" in result.stderr
    assert "buggy_plugin.py:2 (RANK = CONFIG['rank'])" in result.stderr
    assert "installed" not in result.stderr and "Traceback" not in result.stderr


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


def test_16_3_every_argument_of_every_command_says_what_it_takes():
    from harness.cli.main import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for name, command in sub.choices.items():
        for action in command._actions:
            if action.dest in ("help",) or action.help == "==SUPPRESS==":
                continue
            assert action.help, f"`python -m harness {name}`: {action.option_strings} has no help"
        assert sub._name_parser_map[name].description or any(
            c.dest == name for c in sub._choices_actions if c.help
        ), name


def _jobs(output: str) -> dict[str, int]:
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


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


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
    before = _tree(tmp_path / "out")
    dry = snakemake(["-n", "--cores", "1", "--configfile", str(path)], tmp_path)
    assert dry.returncode == 0, dry.stderr[-2000:]
    planned = _jobs(dry.stdout + dry.stderr)
    assert planned == {"evaluate": 1, "figures": 1, "summary": 1, "tables": 1, "all": 1}, dry.stdout[-3000:]
    assert f"run={run_id}" in dry.stdout + dry.stderr
    assert _tree(tmp_path / "out") == before
    redo = snakemake(["--cores", "1", "--configfile", str(path)], tmp_path)
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert _jobs(redo.stdout + redo.stderr) == planned
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
    before = _tree(tmp_path / "out")
    dry = snakemake(["-n", "--cores", "1", "--configfile", str(path)], tmp_path)
    planned = _jobs(dry.stdout + dry.stderr)
    assert planned == {"set_aside": 1, "evaluate": 1, "figures": 1, "summary": 1, "tables": 1, "all": 1}
    assert f"out/runs/{run_id}/metrics.json.corrupt-" in dry.stdout
    assert _tree(tmp_path / "out") == before  # a dry run moves nothing
    redo = snakemake(["--cores", "1", "--configfile", str(path)], tmp_path)
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert _jobs(redo.stdout + redo.stderr) == planned
    assert json.loads(metrics.read_text())["run_id"] == run_id  # evaluated again
    (kept,) = run_dir.glob("metrics.json.corrupt-*")  # the broken file is kept, not deleted
    assert kept.read_text() == '{"run_id": "' + run_id + '", "suite_a'

    # issue 16.8 on the same finished study (one DAG run less): moving the config file redoes nothing
    moved = tmp_path / "elsewhere" / "renamed.yaml"
    moved.parent.mkdir()
    moved.write_text(path.read_text())
    dry = snakemake(["-n", "--cores", "1", "--configfile", str(moved)], tmp_path)
    assert "Nothing to be done" in dry.stdout + dry.stderr, (dry.stdout + dry.stderr)[-2000:]


def test_16_6_a_config_file_that_does_not_exist_is_named_with_the_configs_there(tmp_path, capsys, monkeypatch):
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "mine.yaml").write_text("study: x\n")
    code, _, err = cli(["check", "--config", "config/mnie.yaml"], capsys, monkeypatch, tmp_path)
    assert code == 2
    assert "config file 'config/mnie.yaml' does not exist" in err and "configs in config/: mine.yaml" in err
    # no --configfile and no config/default.yaml where snakemake runs: the same message
    result = snakemake(["-n", "--cores", "1"], tmp_path)
    assert result.returncode != 0
    assert "config file 'config/default.yaml' does not exist" in result.stdout + result.stderr


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


def test_16_9_a_harness_from_another_checkout_is_named(tmp_path):
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "__init__.py").write_text("")  # another checkout's package, not imported
    result = subprocess.run([sys.executable, "-c", "import sys; sys.path.remove(''); from harness.cli.main import main; sys.exit(main(['methods']))"],
                            cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert f"warning: this command runs the harness in {ROOT}, not the checkout in {tmp_path}" in result.stderr


def test_16_9_lm_evals_moe_lora_model_from_another_checkout_names_it(tmp_path):
    """``lm_eval`` run from a second clone imports whichever harness the environment holds
    (the .pth hook registers the model by import path): the model says which one it is."""
    (tmp_path / "harness").mkdir()
    (tmp_path / "harness" / "__init__.py").write_text("")  # another checkout's package, not imported
    code = (
        "import sys; sys.path.remove('')\n"
        "import lm_eval.api.registry as r\n"
        "from harness.model.lm_eval_model import HarnessLM\n"
        "try:\n    HarnessLM(run_dir='no-such-run')\nexcept FileNotFoundError as e:\n    print('refused:', e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (f"warning: lm-eval's moe-lora model runs the harness in {ROOT}, not the checkout in "
            f"{tmp_path}") in result.stderr
    assert "refused: no-such-run is not a run folder" in result.stdout


# -- more mistakes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragments"),
    [
        ({"train__steps": "100"}, ["train.steps = '100' has type str", "expected ['integer', 'null']"]),
        ({"methods": []}, ["methods = []", "should be non-empty"]),
        ({"methods": ["sira", "sira"]}, ["methods lists ['sira'] more than once"]),
        ({"train__seeds": [0, 0]}, ["train.seeds = [0, 0]", "non-unique"]),
        ({"train__seeds": []}, ["train.seeds = []", "should be non-empty"]),
        ({"train__lr": -0.1}, ["train.lr = -0.1 is out of range", "valid: > 0"]),
        ({"methds": ["sira"]}, ["unknown key(s) 'methds' (did you mean 'methods'?)"]),
        ({"budget__active_rank": 8}, ["budget.active_rank = 8 exceeds budget.total_rank = 4"]),
        ({"train__max_length": "long"}, ["train.max_length = 'long'", "auto"]),
        ({"model__adapt_layers": {"top": 0}}, ["model.adapt_layers"]),
    ],
)
def test_16_more_config_mistakes_are_refused_naming_key_and_what_is_valid(tmp_path, overrides, fragments):
    from harness.plan.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(study_config(tmp_path, **overrides))
    for fragment in fragments:
        assert fragment in str(err.value)


def test_16_invalid_yaml_names_the_file_and_line(tmp_path):
    from harness.plan.config import ConfigError, load_config

    path = tmp_path / "study.yaml"
    path.write_text("study: x\nmodel:\n\tsource: tiny-random\n")
    with pytest.raises(ConfigError, match=r"(?s)study.yaml: not valid YAML.*line 3"):
        load_config(path)


@pytest.mark.parametrize(
    ("edit", "fragments"),
    [
        (lambda tr, te: tr.__setitem__(0, {**tr[0], "label": "1"}), ["train.jsonl:1: label '1' is not among the choices", "an index 0..3"]),
        (lambda tr, te: [it.__setitem__("task", "größe") for it in tr + te], ["task name 'größe'", "ASCII letters"]),
        (lambda tr, te: te.append({**te[0], "task": "unseen"}), ["test task(s) 'unseen' have no training items"]),
        (lambda tr, te: tr.__setitem__(1, {**tr[1], "choices": ["only one"], "label": 0}), ["train.jsonl:2: choices must be a list of at least 2 strings"]),
    ],
)
def test_16_more_data_mistakes_are_refused_before_any_job(tmp_path, capsys, monkeypatch, edit, fragments):
    train, test = suite_items()
    edit(train, test)
    path = jsonl_study(tmp_path, train, test)
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2
    for fragment in fragments:
        assert fragment in out


def test_16_data_tasks_naming_a_task_the_files_lack(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    path = jsonl_study(tmp_path, train, test)
    config = yaml.safe_load(path.read_text())
    config["data"]["tasks"] = ["color", "fruit"]
    path.write_text(yaml.safe_dump(config))
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2 and "data.tasks names 'fruit'" in out and "tasks there: color, animal" in out


def test_16_batches_larger_than_a_runs_training_items_are_refused(tmp_path, capsys, monkeypatch):
    path = study_config(tmp_path, train__batch_size=64, data={"source": "generated", "train_per_task": 8, "test_per_task": 4},
                        methods=["moa"], budget={"total_rank": 6, "active_rank": 1, "granularities": [6]})
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2
    assert "FAIL batches: train.batch_size = 64 exceeds the 8 training items of task_adapters/animal-r1-s0-" in out


def test_16_max_length_too_short_names_the_longest_item(tmp_path, capsys, monkeypatch):
    path = study_config(tmp_path, train__max_length=10)
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2
    assert "FAIL lengths: train.max_length = 10 is shorter than the longest training item: generated item" in out
    assert "Set train.max_length to at least" in out and "or to `auto`" in out
    auto = study_config(tmp_path, train__max_length="auto")
    assert cli(["check", "--config", auto], capsys, monkeypatch, tmp_path)[0] == 0


@pytest.mark.parametrize("problem", ["file", "read-only"])
def test_16_an_out_dir_that_cannot_hold_results_is_refused(tmp_path, capsys, monkeypatch, problem):
    if problem == "file":
        (tmp_path / "out").write_text("not a folder")
        fragment = "out_dir 'out' is a file, not a folder"
    else:
        if os.geteuid() == 0:
            pytest.skip("root can write a read-only folder")
        (tmp_path / "ro").mkdir(mode=0o555)
        fragment = "cannot be written"
    path = study_config(tmp_path, out_dir="out" if problem == "file" else "ro/out")
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2 and fragment in out


def test_16_a_run_id_typo_is_answered_with_the_near_ones(tmp_path, capsys, monkeypatch):
    path = study_config(tmp_path)
    (run_id,) = run_ids(path, tmp_path)
    code, _, err = cli(["train", "--config", path, "--run", run_id[:-1] + "x"], capsys, monkeypatch, tmp_path)
    assert code == 2 and f"did you mean {run_id}" in err and "Traceback" not in err


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


def test_16_a_plugin_path_typo_gets_the_install_hint(tmp_path):
    result = harness(["budget", "--config", str(study_config(tmp_path, plugins=["my_lab.frozn"]))], tmp_path, tmp_path)
    assert result.returncode == 2
    assert "plugin 'my_lab.frozn': no module named 'my_lab'" in result.stderr
    assert "installed or on PYTHONPATH" in result.stderr
