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

``scripts/check_imports.sh`` enforces the order.
"""

from __future__ import annotations

from pathlib import Path


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


def load_exported(folder, base_model=None, **options):
    """A model written by ``python -m harness export`` as a transformers model with
    ``.generate()``: :func:`harness.run.export.load_exported` (imported on first use, so
    ``import harness`` stays light)."""
    from harness.run.export import load_exported as load

    return load(folder, base_model, **options)
