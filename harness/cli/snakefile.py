"""What the Snakefile needs: the config file in use, checked, the run plan, and the input
functions that make the DAG tell the truth about the run folders.

Reading the Snakefile validates and plans, nothing else: every check of ``python -m harness
check`` runs (config, plugins and budget, data files, lm-eval task names, batches; the
model and the lengths only warn here and stop a real run before its first job, in the
``onstart`` hook, so a dry run on a machine without the weights still shows the DAG).
Nothing is moved or written. A result that is corrupt, stale, of another run or a score
without its training record is found by the input functions below at DAG-building time:
they ask for the name the file is moved to (:func:`harness.plan.status.aside_name`), so
``snakemake -n`` lists the ``set_aside`` job and the job that redoes the result, and the
real run runs exactly those.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import yaml

from harness.plan.check_cache import deferred_cache, write_deferred_cache
from harness.plan.checks import DRY_RUN_WARNINGS, PreflightError, run_checks
from harness.plan.config import load_config
from harness.plan.status import aside_name, invalid_data_summary, invalid_files, invalid_outputs

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
    """``(config_path, validated config, plan, checks)``; refuses ``--config`` overrides,
    which could not reach the jobs (every rule reads the config file itself). The checks run
    here, once a Snakemake process. Those that need the base model (its presence, the items'
    lengths) only warn here: :func:`assert_model_ready` stops a real run on their results
    before its first job."""
    path = config_path(workflow)
    config = load_config(path)  # a missing file is named, with the configs that exist
    raw = yaml.safe_load(Path(path).read_text()) or {}
    if snakemake_config and snakemake_config != raw:
        changed = sorted(k for k in set(snakemake_config) | set(raw) if snakemake_config.get(k) != raw.get(k))
        raise WorkflowConfigError(
            f"--config overrides ({', '.join(changed)}) are not supported: every job reads "
            f"{path} itself. Copy it, change the copy and pass it with --configfile."
        )
    with deferred_cache():  # the parse writes nothing: onstart writes the verdicts
        checks, plan = run_checks(config)
    for c in checks:
        for warning in c.warnings:
            print(f"harness: warning ({c.name}): {warning}", file=sys.stderr)
    failed = [c for c in checks if not c.ok]
    for c in failed:
        if c.name in DRY_RUN_WARNINGS:
            print(f"harness: warning ({c.name}): {c.detail} — a run (not a dry run) stops here",
                  file=sys.stderr)
    fatal = [c for c in failed if c.name not in DRY_RUN_WARNINGS]
    if fatal:
        lines = "\n".join(f"- {c.name}: {c.detail}" for c in fatal)
        raise PreflightError(f"the study cannot run; {len(fatal)} check(s) failed:\n{lines}")
    return path, config, plan, checks


def assert_model_ready(checks) -> None:
    """The ``onstart`` hook of a real run: stop before the first job when the model or the
    lengths check of :func:`load_study` failed (a dry run only warned; not run again), and
    keep the checks' verdicts for the next parse (the parse itself wrote nothing)."""
    write_deferred_cache()
    failed = [c for c in checks if not c.ok and c.name in DRY_RUN_WARNINGS]
    if failed:
        lines = "\n".join(f"- {c.name}: {c.detail}" for c in failed)
        raise PreflightError(f"the study cannot run; {len(failed)} check(s) failed:\n{lines}")


def one_of(names: list[str]) -> str:
    """A wildcard constraint matching exactly these names (nothing when there are none)."""
    return "|".join(re.escape(n) for n in names) or "(?!)"


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
        if run is not None and (Path(out_dir) / "runs" / run / "train.json").exists() and not any(
                p.name not in SCORE_FILES for p, _, _ in invalid_files(plan, plan.run(run))):
            # a finished training's job will not run again: its components' weights are not
            # needed (a fresh clone has none), only the record that they were trained
            return [f"{out_dir}/{path}/train.json" for path in components.get(run, [])]
        run_id = run or wildcards.path.rpartition("/")[2]
        return [f for path in components.get(run_id, []) for f in needs_weights(out_dir, path)]

    return component_inputs


#: the result files a scoring job writes (``evaluate``, ``tune_score``:
#: :func:`harness.run.evaluate.evaluate_run`); every other result file of a run is its
#: training's (``train``, ``tune_run``, ``train_component``). A file scoring writes must be
#: listed here, or an invalid one would retrain the run instead of rescoring it.
SCORE_FILES = ("metrics.json", "lm_eval_results.json", "routing.json")


def redo_inputs_of(plan, stage: str = "train"):
    """Input function for the jobs that write a run's results: ``stage="train"`` for the
    jobs that train (``train``, ``tune_run``, ``train_component``: their results are the
    training record), ``"score"`` for the jobs that score (``evaluate``, ``tune_score``).
    Nothing when the stage's results are there and valid; else the data summary (so the job
    waits for a data step that must run first) and the names its invalid result files are
    moved to (so the ``set_aside`` job moves them first). A stage asks only for its own
    files: an invalid score never reruns a finished training. Wrapped in ``ancient`` by the
    rules: once moved, an old file never triggers the job again."""
    data_summary = plan.out_dir / "data" / "data_summary.json"
    if stage not in ("train", "score"):
        raise ValueError(f"stage {stage!r}: valid stages are 'train' and 'score'")

    def redo_inputs(wildcards) -> list[str]:
        run_id = getattr(wildcards, "run", None) or wildcards.component.rpartition("/")[2]
        run = plan.run(run_id)
        invalid = [
            str(aside_name(path, why))
            for path, why, _ in invalid_files(plan, run)
            if (path.name in SCORE_FILES) == (stage == "score")
        ]
        done = plan.run_dir(run) / ("metrics.json" if stage == "score" else "train.json")
        return invalid + ([str(data_summary)] if invalid or not done.exists() else [])

    return redo_inputs


def score_inputs_of(out_dir: str, plan):
    """Input function for the scoring rules (``evaluate``, ``tune_score``): a trained run is
    scored after its training job finished (its ``train.json``); when it must be scored and
    its weights (or its components' weights) are not here, their ``restore.json`` instead
    (:func:`needs_weights`). A run whose score is there and valid needs only the record (a
    fresh clone has no weights; its scoring job does not run). The base model needs nothing."""

    def score_inputs(wildcards) -> list[str]:
        run = plan.run(wildcards.run)
        if run.is_base:
            return []
        scored = (plan.run_dir(run) / "metrics.json").exists() and not any(
            p.name in SCORE_FILES for p, _, _ in invalid_files(plan, run))
        if scored:
            return [f"{out_dir}/{run.path}/train.json"]
        return [f for path in [*run.components, run.path] for f in needs_weights(out_dir, path)]

    return score_inputs


def tuned_rate_inputs_of(out_dir: str, plan):
    """Input function for the ``train`` rule: a tuned run waits for the tune stage's choice
    (``tuning/rates.json``); other runs for nothing, and nor does a tuned run whose training
    record is there and valid. Otherwise a choice rewritten for a new method or granularity would
    retrain every finished tuned run of the study (Snakemake reruns the consumers of a file
    another job writes, ``ancient`` or not); a finished run whose rate the choice no longer
    matches is stale instead (:func:`harness.plan.status.invalid_files`) and redone."""
    tuned = {run.run_id for run in plan.runs if run.tuned}

    def tuned_rate_inputs(wildcards) -> list[str]:
        if wildcards.run not in tuned:
            return []
        run = plan.run(wildcards.run)
        trained = [p for p, _, _ in invalid_files(plan, run) if p.name not in SCORE_FILES]
        if (plan.run_dir(run) / "train.json").exists() and not trained:
            return []
        return [f"{out_dir}/tuning/rates.json"]

    return tuned_rate_inputs


def every_set_aside_of(config: dict[str, Any], plan):
    """Input function for ``rule all``: the names every invalid result file of the study is
    moved to. Asked for by the target itself, so a dry run lists each ``set_aside`` job and,
    through it, the job that redoes the result (Snakemake schedules the producer of an
    intermediate file only for a job that must run)."""

    def every_set_aside(wildcards) -> list[str]:
        names = [
            str(aside_name(path, why))
            for run in [*plan.components, *plan.tuning, *plan.runs]
            for path, why, _ in invalid_files(plan, run)
        ]
        found = invalid_data_summary(config, plan)
        names += [str(aside_name(path, why)) for path, why, _ in invalid_outputs(plan)]
        return names + ([] if found is None else [str(aside_name(found[0], found[1]))])

    return every_set_aside


def outputs_set_aside_of(plan, group: str):
    """Input function for the ``summary``, ``tables`` and ``figures`` rules (``group``): the
    names their damaged outputs are moved to (:func:`harness.plan.status.invalid_outputs`: a
    file that differs from its recorded digest, a ``summary.csv`` that does not list the
    study's runs), so the ``set_aside`` job moves them and the rule builds them again."""

    def outputs_set_aside(wildcards) -> list[str]:
        return [str(aside_name(path, why)) for path, why, _ in invalid_outputs(plan, group)]

    return outputs_set_aside


def data_set_aside_inputs_of(config: dict[str, Any]):
    """Input function for the ``data`` rule: a corrupt or stale ``data_summary.json`` is moved
    aside, so the data step writes it again."""

    def data_inputs(wildcards) -> list[str]:
        found = invalid_data_summary(config)
        return [] if found is None else [str(aside_name(found[0], found[1]))]

    return data_inputs
