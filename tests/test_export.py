"""Trained models out (issue 32): ``python -m harness export`` writes a LoRA run as a peft
adapter folder, any mixture as a self-contained folder that ``harness.load_exported`` turns
into a transformers model, and merges LoRA / MultiLoRA into the base weights; every form
gives the logits and greedy generations of the run as the harness loads it. The README's
"Use a trained model" example runs as written."""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch
from peft import PeftConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import harness
from harness.adapters import PluginError, get_method
from harness.cli.main import main as cli_main
from harness.model.base import attach_method, load_base
from harness.model.load import cache_root
from harness.model.run_folder import load_run_model, write_run_spec
from harness.plan.config import validate_config
from harness.plan.study import plan_study
from harness.run.export import ExportError, export_run, load_exported
from tests.conftest import TINY_STUDY_MODEL

ROOT = Path(__file__).resolve().parent.parent
# the methods of the acceptance test: the reference, the dense mixture and three routed ones
METHODS = ["lora", "multilora", "molora", "sira", "smora"]
PROMPT = "Question: which of the following is the largest number? Answer:"


def _tag(method: str) -> str:
    return "r4" if method == "lora" else "G2"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run folder per method of :data:`METHODS` (tiny random Llama, both layers adapted),
    its adapter set by hand to nonzero random values (SMoRA's selection bias too), saved as
    training saves it. Returns ``(config, {method: run folder})``."""
    root = tmp_path_factory.mktemp("export")
    config = validate_config({
        "study": "export",
        "out_dir": str(root / "out"),
        "cache_dir": str(root / ".cache"),
        "model": {**TINY_STUDY_MODEL, "adapt_layers": "all", "device": "cpu", "dtype": "float32"},
        "data": {"source": "generated", "tasks": ["animal", "color"], "train_per_task": 8, "test_per_task": 4},
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": METHODS,
        "train": {"seeds": [0], "steps": 2, "batch_size": 4, "checkpoint_every": 0},
        "eval": {"include_base": False},
    })
    plan = plan_study(config)
    folders = {}
    generator = torch.Generator().manual_seed(1)
    for run in plan.trained_runs:
        if run.tag != _tag(run.method):
            continue
        run_dir = plan.run_dir(run)
        write_run_spec(config, run, run_dir)
        base = load_base(config["model"], cache_root(config), "cpu")
        method = get_method(run.method)
        handle = attach_method(base, method, method.make_config(**run.method_config), seed=0)
        with torch.no_grad():
            for param in handle.trainable_parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
            for name, buffer in base.model.named_buffers():
                if name.endswith("selection_bias"):
                    buffer.copy_(torch.randn(buffer.shape, generator=generator))
        handle.save(run_dir / "adapter")
        folders[run.method] = run_dir
    assert sorted(folders) == sorted(METHODS)
    return config, folders


def _inputs(tokenizer):
    return tokenizer([PROMPT, "Word: cat"], return_tensors="pt", padding=True)


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _greedy(model, tokenizer) -> list[int]:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return out[0, ids["input_ids"].shape[1]:].tolist()


@pytest.fixture(scope="module")
def reference(runs):
    """The harness side, computed once per method: the run loaded by ``load_run_model``, its
    logits on :func:`_inputs` and its greedy continuation of :data:`PROMPT`."""
    _, folders = runs
    cache: dict[str, tuple] = {}

    def get(method: str):
        if method not in cache:
            run = load_run_model(folders[method], device="cpu")
            cache[method] = (run, _logits(run.model, _inputs(run.tokenizer)), _greedy(run.model, run.tokenizer))
        return cache[method]

    return get


def test_lora_run_exports_as_a_peft_adapter_with_the_harness_logits(runs, reference, tmp_path):
    _, folders = runs
    result = export_run(folders["lora"], tmp_path / "lora")
    assert result.kind == "peft"
    assert {"adapter_config.json", "adapter_model.safetensors", "export.json", "README.md"} <= {
        p.name for p in (tmp_path / "lora").iterdir()
    }
    harness_run, expected, greedy = reference("lora")
    peft_config = PeftConfig.from_pretrained(str(tmp_path / "lora"))
    # the folder names the base model the run used
    assert peft_config.base_model_name_or_path == result.base_model
    assert Path(result.base_model) == Path(harness_run.model.name_or_path).resolve()
    assert result.base_model in (tmp_path / "lora" / "README.md").read_text()
    base = AutoModelForCausalLM.from_pretrained(peft_config.base_model_name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "lora"))
    inputs = _inputs(tokenizer)
    assert (expected - _logits(base, inputs)).abs().max() > 1e-2  # the adapter changes the model
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "lora"))
    torch.testing.assert_close(_logits(peft_model, inputs), expected, atol=1e-5, rtol=0)
    assert _greedy(peft_model, tokenizer) == greedy


@pytest.mark.parametrize("method", METHODS)
def test_export_then_load_exported_gives_the_harness_logits_and_generations(runs, reference, tmp_path, method):
    _, folders = runs
    result = export_run(folders[method], tmp_path / method)
    assert result.kind == ("peft" if method == "lora" else "mixture")
    if result.kind == "mixture":  # self-contained: safetensors, JSON and the tokenizer only
        names = {p.name for p in (tmp_path / method).iterdir()}
        assert names <= {"adapter.safetensors", "export.json", "README.md", "tokenizer.json",
                         "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}, names
        meta = json.loads((tmp_path / method / "export.json").read_text())
        assert meta["method"] == method and meta["builtin"] and meta["base_model"]["name_or_path"] == result.base_model
    _, expected, greedy = reference(method)
    model = harness.load_exported(tmp_path / method)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / method))
    torch.testing.assert_close(_logits(model, _inputs(tokenizer)), expected, atol=1e-5, rtol=0)
    assert not any(p.requires_grad for p in model.parameters())
    tokens = _greedy(model, tokenizer)
    assert len(tokens) == 8 and tokens == greedy


@pytest.mark.parametrize("method", ["lora", "multilora"])
def test_merge_writes_a_plain_transformers_model_equal_within_1e5(runs, reference, tmp_path, method):
    _, folders = runs
    result = export_run(folders[method], tmp_path / "merged", merge=True)
    assert result.kind == "merged"
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    weights = load_file(str(tmp_path / "merged" / "model.safetensors"))
    assert not any("lora" in key for key in weights)
    _, expected, greedy = reference(method)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(_logits(merged, _inputs(tokenizer)), expected, atol=1e-5, rtol=0)
    assert _greedy(merged, tokenizer) == greedy


@pytest.mark.parametrize("method", ["sira", "smora", "molora"])
def test_routed_methods_refuse_merge_naming_input_dependent_routing(runs, tmp_path, method):
    _, folders = runs
    with pytest.raises(ExportError, match="input-dependent routing") as info:
        export_run(folders[method], tmp_path / "merged", merge=True)
    assert method in str(info.value) and "load_exported" in str(info.value)
    mergeable = str(info.value).split("merge (Method.mergeable): ")[1].split(", ")
    assert {"LoRA", "MultiLoRA"} <= set(mergeable) and method not in {m.lower() for m in mergeable}
    assert not (tmp_path / "merged").exists()


def test_export_never_overwrites_and_refuses_a_foreign_base_model(runs, tmp_path):
    _, folders = runs
    out = tmp_path / "sira"
    export_run(folders["sira"], out)
    with pytest.raises(ExportError, match="not an empty folder"):
        export_run(folders["sira"], out)
    other = tmp_path / "other-base"  # the run's base model with another rms_norm_eps
    shutil.copytree(json.loads((out / "export.json").read_text())["base_model"]["name_or_path"], other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-3}))
    with pytest.raises(ExportError, match="other config or weight files"):
        load_exported(out, base_model=other)
    weights = out / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ExportError, match="SHA-256 differs"):
        load_exported(out)


@pytest.fixture(scope="module")
def plugin_run(runs, tmp_path_factory):
    """A run of the example plugin ``examples.frozen_router`` (its router a buffer), adapter set
    by hand to nonzero values, on the same tiny base model as :func:`runs`."""
    config, _ = runs
    root = tmp_path_factory.mktemp("plugin")
    config = validate_config({
        **{k: v for k, v in config.items() if k not in ("methods", "out_dir", "plugins")},
        "out_dir": str(root / "out"),
        "plugins": ["examples.frozen_router"],
        "methods": ["frozen_router"],
    })
    plan = plan_study(config)
    run = next(r for r in plan.trained_runs if r.tag == "G2")
    run_dir = plan.run_dir(run)
    write_run_spec(config, run, run_dir)
    base = load_base(config["model"], cache_root(config), "cpu")
    method = get_method(run.method)
    handle = attach_method(base, method, method.make_config(**run.method_config), seed=0)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in handle.trainable_parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    handle.save(run_dir / "adapter")
    return run_dir


def test_a_plugin_run_round_trips_with_trust_plugins(plugin_run, tmp_path):
    out = tmp_path / "frozen"
    result = export_run(plugin_run, out, trust_plugins=True)
    meta = json.loads((out / "export.json").read_text())
    assert result.kind == "mixture" and not meta["builtin"] and meta["plugins"] == ["examples.frozen_router"]
    assert "trust_plugins=True" in (out / "README.md").read_text()
    assert any(key.endswith("projection") for key in load_file(str(out / "adapter.safetensors")))
    run = load_run_model(plugin_run, device="cpu", trust_plugins=True)
    model = load_exported(out, trust_plugins=True)
    inputs = _inputs(run.tokenizer)
    torch.testing.assert_close(_logits(model, inputs), _logits(run.model, inputs), atol=1e-5, rtol=0)
    assert _greedy(model, run.tokenizer) == _greedy(run.model, run.tokenizer)


def test_plugin_code_is_imported_only_with_trust_plugins(runs, tmp_path):
    """An export (or a run folder) whose method no installed code registers names its plugin
    module; it is imported only when asked to, and the message says how."""
    _, folders = runs
    out = tmp_path / "molora"
    export_run(folders["molora"], out)
    meta = json.loads((out / "export.json").read_text())
    meta.update(method="unregistered_plugin_method", builtin=False, plugins=["my_lab.unregistered"])
    (out / "export.json").write_text(json.dumps(meta))
    with pytest.raises(PluginError, match="trust_plugins=True") as info:
        load_exported(out)
    assert "my_lab.unregistered" in str(info.value) and "unregistered_plugin_method" in str(info.value)
    with pytest.raises(PluginError, match="my_lab"):  # opted in: the import itself is tried
        load_exported(out, trust_plugins=True)
    run_dir = tmp_path / "run"
    shutil.copytree(folders["molora"], run_dir)
    spec = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**spec, "method": "unregistered_plugin_method",
                                                  "plugins": ["my_lab.unregistered"]}))
    with pytest.raises(PluginError, match="trust_plugins"):
        export_run(run_dir, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def _section(name: str) -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(rf"^## {re.escape(name)}\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert match, f"README has no section {name!r}"
    return match.group(1)


def test_readme_use_a_trained_model_runs_as_written(runs, tmp_path, monkeypatch):
    """The section's shell block (its ``python -m harness export`` lines) and its Python block
    run as written against run folders at the paths they name; the Python block prints the
    greedy continuation of the harness's loaded run and of each exported form: all equal."""
    _, folders = runs
    section = _section("Use a trained model")
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.startswith("python -m harness export")]
    assert len(commands) == 3
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(code) == 1
    monkeypatch.chdir(tmp_path)
    for command in commands:  # put each run folder where the command expects it
        args = shlex.split(command)[3:]
        run_dir = Path(args[1])
        if not run_dir.exists():
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            run_dir.symlink_to(folders[run_dir.name.split("-")[0]])
        assert cli_main(args) == 0, command
    printed: dict[str, str] = {}
    exec(compile(code[0], "README.md", "exec"),
         {"__name__": "__readme__", "print": lambda label, text: printed.__setitem__(label.rstrip(":"), text)})
    assert sorted(printed) == sorted(
        ["harness LoRA", "peft LoRA", "merged LoRA", "harness SiRA", "exported SiRA"]
    ), printed
    assert printed["peft LoRA"] == printed["merged LoRA"] == printed["harness LoRA"]
    assert printed["exported SiRA"] == printed["harness SiRA"]
    assert printed["harness LoRA"].strip() and printed["harness SiRA"].strip()
