"""What the Snakefile needs at parse time: the config file in use, validated, and the run plan.

Validation, plugin loading and the budget solver all run here, so a bad config,
an unknown method or an infeasible budget stops Snakemake before any job starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

DEFAULT_CONFIG = "config/default.yaml"


class WorkflowConfigError(ValueError):
    pass


def config_path(workflow) -> str:
    files = [str(f) for f in (workflow.overwrite_configfiles or [])]
    if len(files) > 1:
        raise WorkflowConfigError(
            f"give one --configfile (got {len(files)}: {', '.join(files)}); a study is one file"
        )
    return files[0] if files else DEFAULT_CONFIG


def load_study(workflow, snakemake_config: dict[str, Any]):
    """``(config_path, validated config, plan)``; refuses ``--config`` overrides, which could
    not reach the jobs (every rule reads the config file itself)."""
    import yaml

    from harness.config import load_config
    from harness.study import plan_study

    path = config_path(workflow)
    if not Path(path).exists():
        raise WorkflowConfigError(
            f"config file {path!r} does not exist (working directory {Path.cwd()}); "
            "pass one with --configfile"
        )
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if snakemake_config and snakemake_config != raw:
        changed = sorted(k for k in set(snakemake_config) | set(raw) if snakemake_config.get(k) != raw.get(k))
        raise WorkflowConfigError(
            f"--config overrides ({', '.join(changed)}) are not supported: every job reads "
            f"{path} itself. Copy it, change the copy and pass it with --configfile."
        )
    config = load_config(path)
    return path, config, plan_study(config)


def train_json_of(out_dir: str, trained: list[str]):
    """Input function for rules that need a run's ``train.json`` (none for the base model)."""
    trained_ids = set(trained)

    def train_json(wildcards) -> list[str]:
        return [f"{out_dir}/runs/{wildcards.run}/train.json"] if wildcards.run in trained_ids else []

    return train_json


def component_inputs_of(out_dir: str, plan):
    """Input function for the ``train`` rule: the ``train.json`` of every component a run is
    built on (``Run.components``, e.g. a staged method's task adapters); nothing for the rest."""
    components = {run.run_id: list(run.components) for run in plan.runs}

    def component_inputs(wildcards) -> list[str]:
        return [f"{out_dir}/{path}/train.json" for path in components.get(wildcards.run, [])]

    return component_inputs
