"""What the Snakefile needs at parse time: the config file in use, checked, and the run plan.

Every check of ``python -m harness check`` runs here (config, plugins and budget, data
files, lm-eval task names, model, lengths), so bad input stops Snakemake before any job
starts. Then :func:`harness.status.repair` makes the DAG honest about the run folders:
corrupt or stale results are moved aside and redone, a missing result of a finished
study is redone (not "Nothing to be done").
"""

from __future__ import annotations

import sys
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

    from harness.check import assert_ready
    from harness.config import load_config
    from harness.status import repair

    path = config_path(workflow)
    config = load_config(path)  # a missing file is named, with the configs that exist
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if snakemake_config and snakemake_config != raw:
        changed = sorted(k for k in set(snakemake_config) | set(raw) if snakemake_config.get(k) != raw.get(k))
        raise WorkflowConfigError(
            f"--config overrides ({', '.join(changed)}) are not supported: every job reads "
            f"{path} itself. Copy it, change the copy and pass it with --configfile."
        )
    plan = assert_ready(config, dry_run=_dry_run())
    if not _schedules_jobs(workflow):
        pass  # --lint, --list, a job of a cluster run: the run folders are not touched
    elif _locked_by_another_snakemake():
        print("harness: another snakemake holds this folder's lock; run folders left as they are",
              file=sys.stderr)
    else:
        for note in repair(plan, apply=not _dry_run()):
            print(f"harness: {note}", file=sys.stderr)
    return path, config, plan


def _dry_run() -> bool:
    """``snakemake -n`` (``--dry-run``, or ``-n`` among combined short flags such as ``-np``)."""
    for arg in sys.argv[1:]:
        if arg in ("--dry-run", "--dryrun"):
            return True
        if arg.startswith("-") and not arg.startswith("--") and arg[1:].isalpha() and "n" in arg[1:]:
            return True
    return False


#: snakemake options that only read the workflow (nothing is scheduled)
READ_ONLY_OPTIONS = ("--lint", "--list", "-l", "--list-rules", "--list-target-rules", "--containerize")


def _schedules_jobs(workflow) -> bool:
    """True in the snakemake process that plans and runs (or dry-runs) the jobs; false for
    --lint or --list and inside a job of a cluster run (the Snakefile is read before
    Snakemake's own settings say which it is, so the command line tells)."""
    if any(arg in READ_ONLY_OPTIONS for arg in sys.argv[1:]):
        return False
    try:
        return bool(workflow.is_main_process)
    except AttributeError:  # another snakemake version: be careful, touch nothing
        return False


def _locked_by_another_snakemake() -> bool:
    locks = Path(".snakemake") / "locks"
    return locks.is_dir() and any(locks.iterdir())


def needs_weights(out_dir: str, path: str) -> list[str]:
    """What a job that loads the trained weights of ``path`` (a run or component folder)
    needs: its ``train.json`` (the train job writes the weights too), or, when the run is
    finished but its weights are not here (a fresh clone: weights are never committed),
    ``restore.json`` (the restore job retrains them and checks them against the record)."""
    folder = Path(out_dir) / path
    if (folder / "train.json").exists() and not (folder / "adapter" / "adapter.safetensors").exists():
        return [f"{out_dir}/{path}/restore.json"]
    return [f"{out_dir}/{path}/train.json"]


def component_inputs_of(out_dir: str, plan):
    """Input function for the ``train`` rule (and ``restore``): the components a run is built
    on (``Run.components``), trained or, if only their weights are missing, restored."""
    components = {run.run_id: list(run.components) for run in plan.runs}

    def component_inputs(wildcards) -> list[str]:
        run = getattr(wildcards, "run", None)
        if run is not None and (Path(out_dir) / "runs" / run / "train.json").exists():
            # a finished run's train job will not run again: its components' weights are not
            # needed (a fresh clone has none), only the record that they were trained
            return [f"{out_dir}/{path}/train.json" for path in components.get(run, [])]
        run_id = run or wildcards.path.rpartition("/")[2]
        return [f for path in components.get(run_id, []) for f in needs_weights(out_dir, path)]

    return component_inputs


def weights_of(out_dir: str, trained: list[str]):
    """Input function for ``evaluate``: the run's trained weights (see :func:`needs_weights`);
    nothing for the untrained base model."""
    trained_ids = set(trained)

    def weights(wildcards) -> list[str]:
        if wildcards.run not in trained_ids:
            return []
        if (Path(out_dir) / "runs" / wildcards.run / "metrics.json").exists():
            # already scored: evaluate will not run again, so the weights (never committed)
            # are not needed; asking for restore.json would retrain every run of a fresh clone
            return [f"{out_dir}/runs/{wildcards.run}/train.json"]
        return needs_weights(out_dir, f"runs/{wildcards.run}")

    return weights
