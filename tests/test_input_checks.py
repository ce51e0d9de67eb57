"""Issue 31, points 6-8: model limits, data hygiene and path-breaking config values are
refused by ``check`` before any job, naming the file and line (or the config key)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from harness.adapters import PluginError, load_plugin
from harness.model.load import ModelSource, load_tokenizer, model_context, resolve_model
from harness.plan.config import ConfigError, load_config
from tests.conftest import TINY_STUDY_MODEL
from tests.studies import cli, jsonl_study, run_ids, study_config, suite_items

#: the tiny random Llama with a 64-token context: long items are cheap to write
CONTEXT = 64
SMALL = {**TINY_STUDY_MODEL, "tiny": {**TINY_STUDY_MODEL["tiny"], "max_position_embeddings": CONTEXT}}
LONG = " ".join(["Which of the following is the largest number"] * 12)  # well over 64 tokens


def check(tmp_path, capsys, monkeypatch, train, test, **overrides) -> tuple[int, str]:
    """``harness check`` of a JSONL study on the small-context model: ``(exit code, output)``."""
    path = jsonl_study(tmp_path, train, test, model=SMALL, **overrides)
    code, out, err = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    return code, out + err


def fail_line(out: str, name: str) -> str:
    """The text of the failed check ``name`` (its FAIL line and continuation lines)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"FAIL {name}: "))
    block = [lines[start]]
    for line in lines[start + 1:]:
        if not line.startswith("  "):
            break
        block.append(line)
    return "\n".join(block)


# -- 6. model limits ---------------------------------------------------------------------------


def test_the_models_context_is_its_position_count_or_the_tokenizers_limit_whichever_is_smaller(tmp_path):
    source = resolve_model(SMALL, tmp_path)
    tokenizer = load_tokenizer(source)
    assert model_context(source, tokenizer) == (CONTEXT, "config.json max_position_embeddings")
    tokenizer.model_max_length = 40  # a tokenizer that declares a shorter limit wins, and is named
    assert model_context(source, tokenizer) == (40, "the tokenizer's model_max_length")
    # a model whose config declares no position count: the tokenizer's limit alone
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    assert model_context(ModelSource("bare", bare), SimpleNamespace(model_max_length=int(1e30)))[0] is None
    assert model_context(ModelSource("bare", bare), SimpleNamespace(model_max_length=2048)) == (
        2048, "the tokenizer's model_max_length")


def test_a_training_item_longer_than_the_context_is_refused_with_max_length_auto(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    train[2] = {**train[2], "question": LONG}
    code, out = check(tmp_path, capsys, monkeypatch, train, test, train__max_length="auto")
    assert code == 2
    failed = fail_line(out, "lengths")
    assert f"{tmp_path / 'train.jsonl'}:3 (task {train[2]['task']!r})" in failed
    assert f"longer than the model's context of {CONTEXT} tokens (config.json max_position_embeddings)" in failed
    assert f"at most {CONTEXT} for this model" in failed


def test_a_test_item_whose_longest_choice_overflows_the_context_is_refused(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    test[1] = {**test[1], "choices": [*test[1]["choices"][:-1], LONG]}  # the prompt alone is short
    code, out = check(tmp_path, capsys, monkeypatch, train, test, train__max_length="auto")
    assert code == 2
    failed = fail_line(out, "lengths")
    assert "1 test item(s) longer than the model's context of 64 tokens" in failed
    assert f"{tmp_path / 'test.jsonl'}:2 (task {test[1]['task']!r})" in failed
    assert "train" not in failed.split("FAIL lengths: ")[1].split(":")[0]  # no training item named


def test_a_too_short_max_length_never_suggests_a_value_past_the_context(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    train[4] = {**train[4], "question": LONG}
    code, out = check(tmp_path, capsys, monkeypatch, train, test, train__max_length=10)
    assert code == 2
    failed = fail_line(out, "lengths")
    assert f"{tmp_path / 'train.jsonl'}:5" in failed
    assert "Set train.max_length to at least" not in failed
    assert f"no max_length can hold it: shorten or remove it, then set train.max_length to at most {CONTEXT}" in failed


def test_a_max_length_past_the_context_is_refused_and_auto_stays_within_it(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    code, out = check(tmp_path, capsys, monkeypatch, train, test, train__max_length=100)
    assert code == 2
    assert (f"train.max_length = 100 exceeds the model's context of {CONTEXT} tokens "
            "(config.json max_position_embeddings); set it to at most 64") in fail_line(out, "lengths")
    code, out = check(tmp_path, capsys, monkeypatch, train, test, train__max_length="auto")
    assert code == 0, out
    line = next(line for line in out.splitlines() if line.startswith("ok  lengths: "))
    auto = int(line.split("(max_length ")[1].split(")")[0])
    assert 0 < auto <= CONTEXT and f"the model's context of {CONTEXT} tokens" in line


# -- 7. data hygiene ---------------------------------------------------------------------------


def test_a_repeated_test_line_is_refused_naming_both_lines(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    test.insert(5, dict(test[1]))  # line 6 repeats line 2
    code, out = check(tmp_path, capsys, monkeypatch, train, test)
    assert code == 2
    failed = fail_line(out, "hygiene")
    assert f"1 repeated test item(s) (same question and choices): {tmp_path / 'test.jsonl'}:6 repeats " \
           f"{tmp_path / 'test.jsonl'}:2" in failed
    assert "weighing the item twice" in failed


def test_repeated_ids_are_refused_and_a_repeated_training_line_is_a_warning(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    train = [{**item, "id": f"q{i}"} for i, item in enumerate(train)]
    train[7]["id"] = "q3"
    code, out = check(tmp_path, capsys, monkeypatch, train, test)
    assert code == 2
    assert f"{tmp_path / 'train.jsonl'}:8 repeats id \"q3\" of {tmp_path / 'train.jsonl'}:4" in fail_line(out, "hygiene")
    # the same training item twice (same answer) is kept, with a warning naming both lines
    train, test = suite_items()
    train.append(dict(train[0]))
    code, out = check(tmp_path, capsys, monkeypatch, train, test)
    assert code == 0, out
    assert (f"warn hygiene: 1 repeated training item(s) (same question, choices and answer): "
            f"{tmp_path / 'train.jsonl'}:{len(train)} repeats {tmp_path / 'train.jsonl'}:1") in out
    # ... and twice with different answers is refused
    train[-1] = {**train[0], "label": (train[0]["label"] + 1) % len(train[0]["choices"])}
    code, out = check(tmp_path, capsys, monkeypatch, train, test)
    assert code == 2 and "training item(s) repeated with another answer" in fail_line(out, "hygiene")


def test_a_training_item_in_the_test_set_is_refused_unless_declared(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    train.append({**test[3], "question": "  " + test[3]["question"].replace(" ", "  ")})  # spacing differs
    where = f"{tmp_path / 'train.jsonl'}:{len(train)} is test item {tmp_path / 'test.jsonl'}:4"
    code, out = check(tmp_path, capsys, monkeypatch, train, test)
    assert code == 2
    failed = fail_line(out, "hygiene")
    assert where in failed and "set data.allow_overlap: true if the overlap is intended" in failed
    undeclared = run_ids(tmp_path / "study.yaml", tmp_path)
    config = yaml.safe_load((tmp_path / "study.yaml").read_text())
    config["data"]["allow_overlap"] = True
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config))
    code, out, _ = cli(["check", "--config", tmp_path / "study.yaml"], capsys, monkeypatch, tmp_path)
    assert code == 0, out
    assert f"warn hygiene: 1 training item(s) that are also test items (same question and choices): {where}" in out
    # declaring the overlap is not part of what a run computes: the run ids stay the same
    assert run_ids(tmp_path / "study.yaml", tmp_path) == undeclared


def test_a_byte_that_is_not_utf8_is_named_with_its_line(tmp_path, capsys, monkeypatch):
    train, test = suite_items()
    path = jsonl_study(tmp_path, train, test, model=SMALL)
    lines = (tmp_path / "train.jsonl").read_bytes().split(b"\n")
    lines[2] = lines[2].replace(b'"question": "', b'"question": "\xff', 1)
    (tmp_path / "train.jsonl").write_bytes(b"\n".join(lines))
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2
    assert f"FAIL data: {tmp_path / 'train.jsonl'}:3: not UTF-8 text (byte 0xff at byte 15 of the line" in out


# -- 8. config values that would break a path ----------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"out_dir": ""}, "out_dir = '' is empty"),
        ({"out_dir": "out/{run}"}, "out_dir = 'out/{run}' contains '{' and '}': Snakemake reads braces"),
        ({"out_dir": "out\nx"}, "out_dir = 'out\\nx' contains a newline at position 3"),
        ({"cache_dir": "cache\x07"}, "cache_dir = 'cache\\x07' contains control character '\\x07'"),
        ({"data": {"source": "jsonl", "train": "tr{ain}.jsonl", "test": "test.jsonl"}}, "data.train = 'tr{ain}.jsonl' contains"),
    ],
)
def test_a_config_value_that_would_break_a_path_is_refused_naming_the_key(
    tmp_path, capsys, monkeypatch, overrides, fragment
):
    path = study_config(tmp_path, **overrides)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert f"{path}: {fragment}" in str(err.value)
    code, _, stderr = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2 and fragment in stderr and "Traceback" not in stderr


def test_a_plugin_path_that_could_escape_is_a_path_error_not_a_plugin_bug(tmp_path, capsys, monkeypatch):
    path = study_config(tmp_path, plugins=["examples.frozen_router", "../../elsewhere/plugin"])
    code, _, err = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2
    assert "plugins[1] = '../../elsewhere/plugin' is a file path or a relative import" in err
    assert "raised" not in err and "TypeError" not in err
    # the registry refuses it the same way, for every caller
    for spec in ("..evil", "../evil:Method", "a/b"):
        with pytest.raises(PluginError, match=rf"plugin {spec!r} is a file path or a relative import"):
            load_plugin(spec)


BAD_TAG_PLUGIN = """
from harness.adapters import Variant, register
from methods.molora import MoLoRA


@register
class BadTag(MoLoRA):
    name = "bad_tag_h3"
    description = "a variant tag that is not a plain name"

    def variants(self, request, options=None):
        return [Variant(g, f"G{{{g}}}") for g in request.granularities]
"""


def test_a_variant_tag_that_breaks_a_run_folder_name_is_refused(tmp_path, capsys, monkeypatch):
    from harness.adapters import registry

    # the plugin's method leaves the registry with this test (other tests list every method)
    monkeypatch.setattr(registry, "_methods", dict(registry._methods))
    monkeypatch.setattr(registry, "_origin", dict(registry._origin))
    monkeypatch.delitem(sys.modules, "bad_tag_h3", raising=False)
    (tmp_path / "bad_tag_h3.py").write_text(BAD_TAG_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = yaml.safe_load(study_config(tmp_path).read_text())
    config.update(plugins=["bad_tag_h3"], methods=["bad_tag_h3"])
    path = Path(tmp_path / "study.yaml")
    path.write_text(yaml.safe_dump(config))
    code, out, _ = cli(["check", "--config", path], capsys, monkeypatch, tmp_path)
    assert code == 2
    assert "FAIL run names: run folder 'runs/bad_tag_h3-G{2}-s0-" in out
    assert "variant tag 'G{2}'" in out
