"""The MoE-LoRA benchmark harness, by stage (each package may import only those above it):

    adapters/   the toolkit method plugins build on (imports nothing else of the harness)
    common/     files written atomically, provenance, the metric registry
    data/       task suites, JSONL sets, prompts, lm-eval task folders
    model/      loading the base model, the frozen lower-layer cache, run folders,
                the lm-eval model class
    plan/       config and schema, the study plan (runs, components, tuned rates), budget,
                checks, status, memory estimate
    run/        train, evaluate, tune, compose, identity
    analysis/   the results reader, statistics, tables, figures, the outputs registry
    cli/, bench/  entry points (``python -m harness``, the Snakefile's support, the benchmark)

``scripts/check_imports.sh`` enforces the order. Modules moved from the flat layout of
earlier releases (``harness.train``, ``harness.study``, ...) still import, with a
``DeprecationWarning`` naming the new path (:data:`MOVED`).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from pathlib import Path

#: old module path -> new module path (the flat layout before the packages by stage)
MOVED = {
    "harness.io": "harness.common.files",
    "harness.provenance": "harness.common.provenance",
    "harness.modeling": "harness.model.load",
    "harness.split": "harness.model.lower_cache",
    "harness.tokenize": "harness.model.tokens",
    "harness.runtime": "harness.model.base",
    "harness.run_model": "harness.model.run_folder",
    "harness.lm_model": "harness.model.lm_eval_model",
    "harness.config": "harness.plan.config",
    "harness.study": "harness.plan.study",
    "harness.budget": "harness.plan.budget",
    "harness.report": "harness.plan.budget_table",
    "harness.check": "harness.plan.checks",
    "harness.status": "harness.plan.status",
    "harness.memory": "harness.plan.memory",
    "harness.train": "harness.run.train",
    "harness.evaluate": "harness.run.evaluate",
    "harness.compose": "harness.run.compose",
    "harness.identity": "harness.run.identity",
    "harness.results": "harness.analysis.results",
    "harness.stats": "harness.analysis.stats",
    "harness.comparisons": "harness.analysis.comparisons",
    "harness.sharing": "harness.analysis.sharing",
    "harness.render": "harness.common.render",
    "harness.aggregate": "harness.analysis.tables",
    "harness.figures": "harness.analysis.figures",
    "harness.summary": "harness.analysis.summary",
    "harness.workflow_cli": "harness.cli.stages",
    "harness.report_cli": "harness.cli.outputs",
    "harness.bench_cli": "harness.cli.bench",
    "harness.snakemake_support": "harness.cli.snakefile",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Import an old module path as its new module, with a ``DeprecationWarning``."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        new = MOVED[spec.name]
        warnings.warn(
            f"`{spec.name}` moved to `{new}`; the old path will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module):
        """Nothing to run: the new module is already imported and stands in for the old name."""


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def checkout_warning(who: str) -> str | None:
    """``who`` (a command, lm-eval's ``moe-lora`` model) runs a ``harness`` imported from
    another checkout than the one in the working directory (one virtualenv shared by two
    checkouts): the words that say so, naming both; ``None`` when they are the same."""
    here = Path.cwd() / "harness" / "__init__.py"
    imported = Path(__file__).resolve()
    if here.exists() and here.resolve() != imported:
        return (
            f"warning: {who} runs the harness in {imported.parent.parent}, not the checkout "
            f"in {Path.cwd()}; install this checkout into the environment (pip install -e .) or "
            "use a virtualenv per checkout"
        )
    return None
