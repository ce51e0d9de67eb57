"""Plugins: found by config import path (and entry points), listed, budgeted, checked."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.adapters import PluginError, TargetShape, UnknownMethodError, get_method, load_plugin
from harness.adapters.inject import CountMismatchError, apply_method

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "frozen_router.py"


def _run(args, cwd, pythonpath):
    env = {"PYTHONPATH": str(pythonpath), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "harness", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def test_readme_plugin_example_is_the_tested_file():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert EXAMPLE.read_text().strip() in [b.strip() for b in blocks]


@pytest.fixture
def plugin_dir(tmp_path):
    package = tmp_path / "my_lab"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "frozen.py").write_text(EXAMPLE.read_text())
    study = tmp_path / "study.yaml"
    study.write_text(
        textwrap.dedent(
            """
            study: plugin
            plugins: [my_lab.frozen]
            model: {source: tiny-random, adapt_layers: {top: 2}}
            data: {source: generated}
            budget: {total_rank: 8, active_rank: 2, granularities: [4, 8]}
            methods: [lora, frozen_router]
            """
        )
    )
    return tmp_path, study


def test_plugin_from_config_import_path_appears_in_methods_and_budget(plugin_dir):
    folder, study = plugin_dir
    listed = _run(["methods", "--config", str(study)], folder, folder)
    assert listed.returncode == 0, listed.stderr
    assert "frozen_router" in listed.stdout
    assert "top-k LoRA experts chosen by a fixed random projection" in listed.stdout
    assert "plugin: my_lab.frozen.FrozenRouterLoRA" in listed.stdout
    budget = _run(["budget", "--config", str(study)], folder, folder)
    assert budget.returncode == 0, budget.stderr
    rows = [line.split() for line in budget.stdout.splitlines() if line.strip().startswith("frozen_router-")]
    assert [r[0] for r in rows] == ["frozen_router-G4", "frozen_router-G8"]
    # no trainable router: total = LoRA rank 8's adapter parameters, router column 0
    lora = next(line.split() for line in budget.stdout.splitlines() if line.strip().startswith("lora-r8"))
    assert rows[0][5] == lora[5] and rows[0][7] == "0"


def test_plugin_that_does_not_import_names_the_module_and_error(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(
        "study: x\nplugins: [no_such_lab.method]\nmodel: {source: tiny-random}\n"
        "data: {source: generated}\nbudget: {total_rank: 4, active_rank: 2, granularities: [2]}\nmethods: [lora]\n"
    )
    out = _run(["budget", "--config", str(study)], tmp_path, tmp_path)
    assert out.returncode == 2
    assert "plugin 'no_such_lab.method': no module named 'no_such_lab'" in out.stderr
    assert "installed or on PYTHONPATH" in out.stderr
    assert "Traceback" not in out.stderr


def test_plugin_with_its_own_bug_is_reported_with_its_file_line_and_exception(tmp_path, monkeypatch):
    """The module was found: no install hint, but where it failed and why."""
    (tmp_path / "buggy_lab.py").write_text("import collections\n\nSETTINGS = {}\nRANK = SETTINGS['rank']\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as err:
        load_plugin("buggy_lab")
    message = str(err.value)
    assert "plugin 'buggy_lab' raised KeyError: 'rank'" in message
    assert f"{tmp_path / 'buggy_lab.py'}:4 (RANK = SETTINGS['rank'])" in message
    assert "installed" not in message
    # a missing dependency of the plugin (not the plugin itself) is the plugin's bug too
    (tmp_path / "needs_dep.py").write_text("import not_a_real_dependency_xyz\n")
    with pytest.raises(PluginError, match=r"plugin 'needs_dep' raised ModuleNotFoundError: No module named 'not_a_real_dependency_xyz' at .*needs_dep.py:1"):
        load_plugin("needs_dep")


def test_unknown_method_lists_registered_ones_and_suggests_a_near_miss():
    with pytest.raises(UnknownMethodError) as err:
        get_method("smra")
    message = str(err.value)
    assert message.startswith("unknown method 'smra' (did you mean 'smora'?). Registered methods: ")
    listed = message.split("Registered methods: ", 1)[1].split(".", 1)[0].split(", ")
    assert {"lora", "malora", "moa", "molora", "multilora", "sira", "smora"} <= set(listed)
    assert listed == sorted(listed)
    with pytest.raises(UnknownMethodError) as err:
        get_method("xyz")
    assert "did you mean" not in str(err.value)


def test_plugin_module_that_registers_nothing_is_refused(tmp_path, monkeypatch):
    (tmp_path / "empty_plugin.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError, match="registered no method"):
        load_plugin("empty_plugin")


def test_plugin_whose_count_disagrees_with_its_modules_is_refused_with_both_numbers(tmp_path, monkeypatch):
    (tmp_path / "miscounting.py").write_text(
        textwrap.dedent(
            """
            from harness.adapters import register
            from methods.sira import SiRA

            @register
            class Miscounted(SiRA):
                name = "miscounted"
                description = "forgets to count its router"

                def count(self, config, shape):
                    c = super().count(config, shape)
                    return type(c)(c.total - c.router, c.activated - c.router, 0)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    load_plugin("miscounting")
    method = get_method("miscounted")
    holder = nn.Module()
    holder.linear = nn.Linear(10, 6)
    config = method.make_config(num_experts=4, expert_rank=2, top_k=1)
    with pytest.raises(CountMismatchError) as err:
        apply_method(holder, method, config, [TargetShape("linear", 10, 6)])
    # real: 4*2*(10+6) + 4*10 = 168; reported: 128
    assert "reports 128 trainable parameters but its modules hold 168 (difference +40)" in str(err.value)


def test_plugin_trains_through_the_shared_interface():
    sys.path.insert(0, str(EXAMPLE.parent))
    try:
        load_plugin("frozen_router")
    finally:
        sys.path.remove(str(EXAMPLE.parent))
    method = get_method("frozen_router")
    holder = nn.Module()
    holder.linear = nn.Linear(12, 8)
    handle = apply_method(holder, method, method.make_config(num_experts=4, expert_rank=2, top_k=2), [TargetShape("linear", 12, 8)])
    assert handle.analytic_count().router == 0
    holder.linear(torch.randn(5, 12))
    assert len(handle.expert_load()["linear"]) == 4
