"""The engine by stage: the import order enforced, old module paths still importable, metrics
and outputs declared once (and the README's list follows the outputs registry), a plugin's
code change noticed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_STUDY_MODEL

ROOT = Path(__file__).resolve().parents[1]


def test_an_import_against_the_stage_order_fails_the_check(tmp_path):
    """``scripts/check_imports.sh`` forbids every arrow from a stage to a later one: a plan
    module importing the run stage is named."""
    for part in ("harness", "methods", "examples", "scripts"):
        shutil.copytree(ROOT / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    budget = tmp_path / "harness" / "plan" / "budget.py"
    budget.write_text(budget.read_text() + "\nfrom harness.run.train import train_run  # noqa\n")
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    result = subprocess.run(["bash", "scripts/check_imports.sh"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 1
    assert "forbidden: harness.plan.budget -> harness.run.train  (harness.plan:harness.run)" in result.stdout
    # and a new top-level engine module must be placed in the order
    (tmp_path / "harness" / "extras.py").write_text("")
    budget.write_text(budget.read_text().replace("from harness.run.train import train_run  # noqa\n", ""))
    result = subprocess.run(["bash", "scripts/check_imports.sh"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=env)
    assert result.returncode == 1 and "harness/extras is in no stage" in result.stderr


def test_the_brier_score_is_read_per_item_and_declared_for_uniform_choices_only():
    from harness.common.metrics import brier_item, metric, metrics_for, primary_for

    assert brier_item({"brier_score": (1, [0.25, 0.75])}) == pytest.approx(0.25**2 + 0.25**2)
    assert brier_item({"brier_score": (0, [1.0, 0.0, 0.0])}) == 0.0
    uniform = [{"choices": ["a", "b"]}, {"choices": ["c", "d"]}]
    ragged = [{"choices": ["a", "b"]}, {"choices": ["c", "d", "e"]}]
    assert [m.name for m in metrics_for(uniform)] == ["acc", "acc_norm", "brier_score"]
    assert [m.name for m in metrics_for(ragged)] == ["acc", "acc_norm"]
    assert primary_for(uniform) == "acc" and primary_for([{"choices": ["a b", "c"]}]) == "acc_norm"
    assert metric("brier_score").higher_is_better is False and metric("brier_score").unit == "score"
    # a number no one declared is a plain score: never multiplied by 100
    assert metric("something_new").scale == 1.0 and metric("something_new").higher_is_better is None


def test_the_readme_lists_every_table_and_figure_of_the_outputs_registry():
    from harness.analysis.outputs import outputs

    readme = (ROOT / "README.md").read_text()
    block = readme.split("## What comes out where", 1)[1].split("\n## ", 1)[0]
    tables = block.split("\n  tables/", 1)[1].split("(CSV", 1)[0]
    figures = block.split("\n  figures/", 1)[1].split("(PNG", 1)[0]
    listed_tables = {w.strip() for w in tables.replace("\n", " ").split(",")}
    listed_figures = {w.strip() for w in figures.replace("\n", " ").split(",")}
    assert listed_tables == {o.name for o in outputs("table")}
    assert listed_figures == {o.name for o in outputs("figure")}


PLUGIN = '''"""A test plugin: top-k experts behind a fixed scale."""
from harness.adapters import BlockMixtureLayer, BlockMixtureMethod, Routing, register
from harness.adapters.routing import topk_softmax

SCALE = {scale}


class Layer(BlockMixtureLayer):
    def route(self, x, token_mask):
        # a comment: {comment}
        index, weight = topk_softmax(self.router_logits(x) * SCALE, self.top_k)
        return Routing(index=index, weight=weight)


@register
class Scaled(BlockMixtureMethod):
    name = "scaled_router"
    description = "test plugin"
    layer_cls = Layer
'''


def test_a_changed_plugin_makes_its_trained_runs_stale_and_a_docstring_does_not(tmp_path, monkeypatch, capsys):
    from harness.cli.main import main
    from harness.plan.config import load_config
    from harness.plan.status import invalid_files
    from harness.plan.study import plan_study

    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(PLUGIN.format(scale=1.0, comment="first"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    config = {
        "study": "code", "out_dir": "out", "plugins": ["my_plugin"], "model": TINY_STUDY_MODEL,
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": ["scaled_router"],
        "data": {"source": "generated", "tasks": ["animal", "color"], "train_per_task": 8, "test_per_task": 4},
        "train": {"seeds": [0], "steps": 2, "batch_size": 4}, "eval": {"include_base": False},
    }
    path = tmp_path / "code.yaml"
    path.write_text(yaml.safe_dump(config))
    (run,) = plan_study(load_config(path)).runs
    assert run.method_source["files"] == ["my_plugin.py"] and not run.method_source["builtin"]
    assert main(["data", "--config", str(path)]) == 0
    assert main(["train", "--config", str(path), "--run", run.run_id, "--quiet", "--no-score"]) == 0
    recorded = json.loads((tmp_path / "out" / "runs" / run.run_id / "train.json").read_text())["method_source"]
    assert recorded == run.method_source

    def replan():
        sys.modules.pop("my_plugin", None)
        from harness.adapters import registry

        registry._methods.pop("scaled_router", None)
        return plan_study(load_config(path))

    plugin.write_text(PLUGIN.format(scale=1.0, comment="only a comment changed"))
    plan = replan()
    assert plan.runs[0].run_id == run.run_id and invalid_files(plan, plan.runs[0]) == []
    plugin.write_text(PLUGIN.format(scale=2.0, comment="first"))
    plan = replan()
    assert plan.runs[0].run_id == run.run_id  # the run keeps its id; its training is stale
    ((file, why, detail),) = invalid_files(plan, plan.runs[0])
    assert file.name == "train.json" and why == "stale"
    assert detail == "the code of method 'scaled_router' changed since it trained (my_plugin.py)"
    capsys.readouterr()
    assert main(["status", "--config", str(path)]) == 0
    assert "stale" in capsys.readouterr().out


def test_a_built_in_method_records_its_source():
    from harness.adapters import get_method
    from harness.plan.study import method_source

    source = method_source(get_method("moa"))
    assert source["builtin"] is True
    assert source["files"] == ["methods/moa/__init__.py", "methods/moa/layer.py", "methods/moa/task_adapters.py"]
    assert len(source["digest"]) == 16
