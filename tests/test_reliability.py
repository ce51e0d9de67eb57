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
    from harness.config import load_config
    from harness.study import plan_study

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
            ["unknown key(s) 'opts' in methods[1]"],
        ),
    ],
)
def test_1_schema_errors_name_key_value_and_what_is_allowed(tmp_path, override, fragments):
    from harness.config import ConfigError, load_config

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
    from harness.modeling import ModelSourceError, resolve_model

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

    state = killed_dir / "out" / "runs" / run_id / "checkpoints" / "last" / "state.pt"
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
    from harness.io import atomic_write_json

    target = tmp_path / "metrics.json"
    atomic_write_json(target, {"suite_acc": 0.5})

    circular: dict = {"suite_acc": 0.7}
    circular["self"] = circular  # fails half-way through serialisation
    with pytest.raises(ValueError, match="Circular reference"):
        atomic_write_json(target, circular)
    assert json.loads(target.read_text()) == {"suite_acc": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_9_result_writers_go_through_the_atomic_helpers():
    sources = {p.name: p.read_text() for p in (ROOT / "harness").glob("*.py")}
    for name in ("train.py", "evaluate.py", "summary.py", "aggregate.py"):
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
    assert f"{run_dir.relative_to(folder)}/train.json exists" in retrain.stderr
    assert "never overwritten" in retrain.stderr
    reeval = harness(["evaluate", "--config", str(cfg), "--run", run_id], folder)
    assert reeval.returncode == 2 and "metrics.json exists" in reeval.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_11_a_folder_holding_a_different_run_is_refused(tmp_path):
    from types import SimpleNamespace

    from harness.run_model import RunFolderConflict, write_run_spec

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
