"""Bad input is refused early and clearly (issues 7 and 16): a config, data file, plugin,
model or command-line mistake is named with its file, field or value and what is valid,
before any job, through the CLI and Snakemake a user runs. Points 2, 3 and 6 are also
covered at the API level in test_plugins.py and test_budget.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import TINY_STUDY_MODEL as TINY
from tests.studies import (
    ROOT,
    cli,
    env,
    harness,
    jsonl_study,
    run_ids,
    snakemake,
    study_config,
    suite_items,
)

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




# == issue 16: what a new user meets =========================================================
#
# Each point of the issue, then more mistakes a researcher makes with a study config, a data
# file, a plugin or the command line; every one is refused with a message that names the
# file, field or value and what is valid, or handled without losing anything.



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


def test_16_a_plugin_path_typo_gets_the_install_hint(tmp_path):
    result = harness(["budget", "--config", str(study_config(tmp_path, plugins=["my_lab.frozn"]))], tmp_path, tmp_path)
    assert result.returncode == 2
    assert "plugin 'my_lab.frozn': no module named 'my_lab'" in result.stderr
    assert "installed or on PYTHONPATH" in result.stderr
