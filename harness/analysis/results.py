"""The one reader of stored run results: everything tables, figures and the summary show.

Reads only what the runs left on disk — ``metrics.json``, ``train.json``,
``train_log.jsonl``, ``routing.json`` and ``samples.json`` in ``{out_dir}/runs/{run_id}/`` (and a
component's ``train.json`` for the time of earlier stages) — plus the study plan (budget
rows, run ids); it never trains or evaluates anything. The metrics computed from stored
samples (:mod:`harness.analysis.sample_metrics`) are computed here, for every run whose
folder holds ``samples.json``, and read downstream like lm-eval's own. Every run the plan lists must have
its files: a missing file is reported by run id and file name
(:class:`MissingResultsError`), never silently dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

import harness.analysis.sample_metrics  # noqa: F401  (registers the metrics from stored samples)
from harness.adapters import get_method
from harness.adapters.metrics import Metric
from harness.common.files import read_json
from harness.common.manifest import manifest_digests, verify_files
from harness.common.metrics import (
    SAMPLES_FILE,
    from_samples,
    metric,
    registered,
    sample_metrics,
    task_metrics,
)

if TYPE_CHECKING:
    from harness.plan.study import StudyPlan


class MissingResultsError(FileNotFoundError):
    """A run of the plan without its stored results; the message names every one."""


def display_name(method: str) -> str:
    """How tables and figures print a method (its ``display_name``; ``base model``)."""
    if method == "base":
        return "base model"
    try:
        return get_method(method).label
    except KeyError:
        return method


@dataclass
class StudyResults:
    """Everything the tables and figures need, read from disk.

    ``runs``: one row per run (``run_id, key, method, variant, granularity, seed,
    suite_acc, metric:<name>... (a method's scalar evaluation metrics, e.g. a router's
    accuracy), effective_experts, experts_per_token, general_word_ppl (the general text's
    word perplexity), acc:<task>... (each task's primary metric: acc or acc_norm),
    lm:<metric>:<task>... (every registered task metric lm-eval reported, and its stderr),
    suite:<metric>... (the suite mean of a secondary metric), total, activated, router,
    train_s, cache_build_s, eval_s, final_loss, cost:<field>...`` (:data:`COST_FIELDS`,
    measured while training), ``forgetting`` (the general text's word perplexity over the
    untrained model's, minus 1: 0.05 = 5% higher)), accuracies as fractions in [0, 1]. ``curves``: one row per logged training step
    (``run_id, key, method, variant, granularity, seed, step, loss``). ``loads``: the last
    logged expert load of each routed run, one row per (run, layer, expert)
    (``..., step, layer, expert, share, order``; ``order`` is the expert's position when
    that layer's shares are sorted from largest to smallest). ``curves`` and ``loads`` are
    empty unless the logs were read.
    """

    plan: StudyPlan
    runs: pd.DataFrame
    tasks: list[str]
    curves: pd.DataFrame
    loads: pd.DataFrame
    metrics: dict[str, dict[str, Any]]
    train: dict[str, dict[str, Any]]
    #: seconds the one-time lower-layer cache builds took (whichever jobs did them), not
    #: counted in any run's training time
    cache_build_s: float = 0.0
    #: per-task shares of the answer-free baselines from the data step: ``majority`` (always
    #: the most common label) and ``chance`` (a uniformly random choice)
    baselines: dict[str, dict[str, float]] = field(default_factory=dict)
    #: run id -> its ``routing.json`` (routed runs: each task's expert shares per module)
    routing: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: task -> its family, when the data names families (the generated suite does)
    families: dict[str, str] | None = None
    #: the runs whose folders hold stored samples (``samples.json``): the metrics computed
    #: from them (:mod:`harness.analysis.sample_metrics`) exist for these runs only
    with_samples: list[str] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        """Method x variant keys in table order (:func:`variant_keys`)."""
        return variant_keys(self.plan)


def variant_key(method: str, variant: str) -> str:
    return f"{method}-{variant}"


def reference_key(plan: StudyPlan, which: str = "R") -> str | None:
    """The key of the reference at rank R (``which="R"``, same total) or rank K (``"K"``,
    same activated), or ``None`` when the study does not run it."""
    for row in plan.rows:
        if row.variant.reference == which:
            return variant_key(row.method, row.variant.tag)
    return None


def is_reference(plan: StudyPlan, method: str) -> bool:
    """Whether ``method`` is the study's reference method (its rows are the budget targets)."""
    return any(row.method == method and row.reference_method for row in plan.rows)


def base_key(plan: StudyPlan) -> str | None:
    base = [r for r in plan.runs if r.is_base]
    return variant_key("base", base[0].tag) if base else None


def variant_keys(plan: StudyPlan) -> list[str]:
    """Method x variant keys in table order: base, the reference at rank R, at rank K, then
    the rest in the order of the study's budget rows."""
    keys: list[str] = []
    if (b := base_key(plan)) is not None:
        keys.append(b)
    for ref in (reference_key(plan, "R"), reference_key(plan, "K")):
        if ref is not None and ref not in keys:
            keys.append(ref)
    for row in plan.rows:
        key = variant_key(row.method, row.variant.tag)
        if key not in keys:
            keys.append(key)
    return keys


def row_label(plan: StudyPlan, method: str, variant: str) -> str:
    """A reader's name for a method x variant: ``SiRA G=8``, ``LoRA r=16 (rank R)``."""
    if method == "base":
        return "base model (untrained)"
    name = display_name(method)
    for row in plan.rows:
        if row.method == method and row.variant.tag == variant and row.variant.reference:
            return f"{name} r={row.variant.rank} (rank {row.variant.reference})"
    if variant.startswith("G") and variant[1:].isdigit():
        return f"{name} G={variant[1:]}"
    return f"{name} {variant}"


def _read_json_named(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _read_log(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: not valid JSON ({exc})") from None
    return records


def missing_results(plan: StudyPlan, logs: bool = False) -> list[tuple[str, str]]:
    """``(run_id, file name)`` for every stored result the plan expects and the disk lacks."""
    needed = ["metrics.json"]
    trained = ["train.json", *(["train_log.jsonl"] if logs else [])]
    missing = []
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        for name in needed + ([] if run.is_base else trained):
            if not (run_dir / name).exists():
                missing.append((run.run_id, name))
    return missing


def _raise_missing(plan: StudyPlan, missing: list[tuple[str, str]]) -> None:
    by_run: dict[str, list[str]] = {}
    for run_id, name in missing:
        by_run.setdefault(run_id, []).append(name)
    listed = "; ".join(f"{run_id}: {', '.join(names)}" for run_id, names in by_run.items())
    raise MissingResultsError(
        f"{len(by_run)} of {len(plan.runs)} run(s) of study {plan.config['study']!r} lack stored "
        f"results in {plan.out_dir / 'runs'} — {listed}. Tables and figures are built only from "
        "complete results: run the study (`snakemake --cores N --configfile <config>`) or copy "
        "the missing run folders in."
    )


#: what each run's training cost, measured (``train.json``'s ``cost``, :mod:`harness.run.train`)
COST_FIELDS = (
    "tokens_per_s",
    "peak_rss_mib",
    "cuda_max_allocated_mib",
    "estimated_allocated_mib",
    "adapter_bytes",
)


def lm_eval_columns() -> list[str]:
    """The per-task numbers the summary shows beside the primary score: every registered task
    metric and its stderr (:mod:`harness.common.metrics`), then every metric computed from
    stored samples."""
    return [name for m in task_metrics() for name in (m.name, f"{m.name}_stderr")] + list(sample_metrics())


def with_sample_metrics(metrics: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """``metrics`` with every metric computed from the run's stored samples
    (``samples.json``; :func:`harness.common.metrics.from_samples`) added where lm-eval's own
    are: a suite task's value in ``tasks`` (its primary filter: ``none``, else the first) and
    per-item values in ``items``; an extra registry task's under ``metric,filter`` in
    ``extra_tasks`` and ``extra_items``. Unchanged without stored samples (runs evaluated
    before samples were kept). A samples file that differs from the digest its writer recorded
    is never used (:class:`~harness.common.manifest.VerificationError`)."""
    path = run_dir / SAMPLES_FILE
    if not sample_metrics() or not path.is_file():
        return metrics
    verify_files(run_dir, manifest_digests(run_dir) or {}, [SAMPLES_FILE], affects=f"run {run_dir.name}")
    stored = _read_json_named(path)
    if stored.get("run_id", metrics.get("run_id")) != metrics.get("run_id"):
        raise ValueError(f"{path} belongs to run {stored.get('run_id')!r}, not {metrics.get('run_id')!r}")
    tasks = {t: dict(v) for t, v in (metrics.get("tasks") or {}).items()}
    items = {t: dict(v) for t, v in (metrics.get("items") or {}).items()}
    for task, entry in (stored.get("tasks") or {}).items():
        by_filter = from_samples(entry)
        chosen = "none" if "none" in by_filter else next(iter(by_filter), None)
        if task not in tasks or chosen is None:
            continue
        for name, (value, values) in by_filter[chosen].items():
            tasks[task][name] = value
            if values is not None:
                items.setdefault(task, {})[name] = values
    extra = {t: dict(v) for t, v in (metrics.get("extra_tasks") or {}).items()}
    extra_items = {t: dict(v) for t, v in (metrics.get("extra_items") or {}).items()}
    for task, entry in (stored.get("extra_tasks") or {}).items():
        for filter_, by_name in from_samples(entry).items():
            for name, (value, values) in by_name.items():
                extra.setdefault(task, {})[f"{name},{filter_}"] = value
                if values is not None:
                    extra_items.setdefault(task, {})[f"{name},{filter_}"] = values
    return {**metrics, "tasks": tasks, "items": items, "extra_tasks": extra, "extra_items": extra_items}


def extra_metric_keys(metrics: dict[str, Any]) -> dict[str, list[str]]:
    """Per registry task of ``eval.tasks`` beyond the suite (``metrics.json``'s
    ``extra_tasks``), the keys of its metrics as lm-eval keys them (``metric,filter``; stderrs
    left out), in the order reported."""
    suite = set(metrics.get("tasks") or {})
    return {
        task: [k for k, v in values.items()
               if "," in k and "_stderr," not in k and isinstance(v, (int, float)) and not isinstance(v, bool)]
        for task, values in (metrics.get("extra_tasks") or {}).items()
        if task not in suite
    }


def extra_metric(metrics: dict[str, Any] | None, task: str, key: str) -> Metric:
    """How a metric of a registry task beyond the suite is shown: a registered metric by its
    declaration (unit, decimals, direction), another in lm-eval's direction (recorded as
    ``extra_higher_is_better``) as a plain score; labelled ``<task> <label> (<filter>)``."""
    name, _, filter_ = key.partition(",")
    declared = registered().get(name)
    direction = ((metrics or {}).get("extra_higher_is_better") or {}).get(task, {}).get(name)
    base = declared or metric(name)
    label = f"{task} {base.label}" + ("" if filter_ in ("", "none") else f" ({filter_})")
    return Metric(key, label, unit=base.unit, decimals=base.decimals,
                  higher_is_better=base.higher_is_better if declared is not None else direction)


def suite_metric(metrics: dict[str, Any], name: str) -> float | None:
    """The unweighted mean over tasks of one task metric, over the tasks that report it
    (``None`` when none does)."""
    values = [v.get(name) for v in (metrics.get("tasks") or {}).values()]
    values = [float(v) for v in values if isinstance(v, (int, float))]
    return float(np.mean(values)) if values else None


def primary_metrics(results: StudyResults) -> dict[str, str]:
    """Each task's primary metric (``acc`` or ``acc_norm``) as the evaluations recorded it."""
    out: dict[str, str] = {}
    for metrics in results.metrics.values():
        for task, value in (metrics.get("tasks") or {}).items():
            out.setdefault(task, value.get("primary", "acc"))
    return out


def task_score(value: dict[str, Any]) -> float | None:
    """A task's reported score: its primary metric (``score``; results written before the
    primary metric existed report ``acc``)."""
    return value.get("score", value.get("acc"))


def suite_score(metrics: dict[str, Any]) -> float:
    """``suite_acc`` (the mean over tasks of each task's primary metric); where none was
    recorded, the unweighted mean of the task scores."""
    suite = metrics.get("suite_acc")
    if suite is not None:
        return float(suite)
    scores = [task_score(v) for v in metrics.get("tasks", {}).values()]
    scores = [s for s in scores if s is not None]
    return float(np.mean(scores)) if scores else math.nan


def train_seconds(train: dict[str, Any]) -> float:
    """A run's training wall time without the lower-layer cache: ``timing.wall_s`` minus
    ``lower_layer_cache.seconds`` (building the study's cache, waiting for another job to
    build it, or loading it), so a run that waited for the one-time build is not charged
    for it (older results: ``timing.train_s``, else ``wall_s``)."""
    timing = train.get("timing") or {}
    cache = train.get("lower_layer_cache") or {}
    if "wall_s" in timing and cache.get("seconds") is not None:
        return round(float(timing["wall_s"]) - float(cache["seconds"]), 3)
    return timing.get("train_s", timing.get("wall_s", math.nan))


def component_seconds(plan: StudyPlan, run) -> float:
    """Training wall time of the components a run was built on (``Run.components``, e.g. a
    staged method's task adapters; 0 for other methods), summed; NaN if one has no
    ``train.json``."""
    total = 0.0
    for component in getattr(run, "components", None) or []:
        path = plan.out_dir / component / "train.json"
        if not path.exists():
            return math.nan
        total += train_seconds(_read_json_named(path))
    return total


def collect_results(plan: StudyPlan, logs: bool = False) -> StudyResults:
    """Read every run's stored results; raise :class:`MissingResultsError` naming every
    missing ``(run id, file)`` if any run of the plan is incomplete.

    ``logs=True`` also reads ``train_log.jsonl`` (training curves and expert loads).
    """
    missing = missing_results(plan, logs=logs)
    if missing:
        _raise_missing(plan, missing)
    rows, curves, loads = [], [], []
    all_metrics, all_train, all_routing = {}, {}, {}
    with_samples: list[str] = []
    tasks: list[str] = []
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        metrics = _read_json_named(run_dir / "metrics.json")
        if metrics.get("run_id", run.run_id) != run.run_id:
            raise ValueError(
                f"{run_dir / 'metrics.json'} belongs to run {metrics.get('run_id')!r}, not "
                f"{run.run_id!r}: the folder was copied or renamed; rerun its evaluation"
            )
        metrics = with_sample_metrics(metrics, run_dir)
        if (run_dir / SAMPLES_FILE).is_file():
            with_samples.append(run.run_id)
        all_metrics[run.run_id] = metrics
        if (run_dir / "routing.json").exists():
            all_routing[run.run_id] = _read_json_named(run_dir / "routing.json")
        for task in metrics.get("tasks", {}):
            if task not in tasks:
                tasks.append(task)
        ident = {
            "run_id": run.run_id,
            "key": variant_key(run.method, run.tag),
            "method": run.method,
            "variant": run.tag,
            "granularity": run.granularity,
            "seed": run.seed,
        }
        row: dict[str, Any] = {
            **ident,
            "suite_acc": suite_score(metrics),
            **{
                f"metric:{name}": value
                for name, value in (metrics.get("method_metrics") or {}).items()
                if isinstance(value, (int, float)) or value is None
            },
            "effective_experts": metrics.get("effective_experts"),
            "experts_per_token": metrics.get("experts_per_token"),
            # the general text (eval.general_text): lm-eval's word perplexity and the loss per
            # word (nats) it is the exponential of
            "general_word_ppl": (metrics.get("general_text") or {}).get("word_perplexity"),
            **{f"acc:{t}": task_score(v) for t, v in metrics.get("tasks", {}).items()},
            # lm-eval's own numbers beside the primary score: every task metric, its stderr
            **{
                f"lm:{m}:{t}": v.get(m)
                for t, v in metrics.get("tasks", {}).items()
                for m in lm_eval_columns()
            },
            # the suite mean of each metric the main table shows beside the primary score
            **{f"suite:{m.name}": suite_metric(metrics, m.name)
               for m in [*task_metrics(), *(d for d, _ in sample_metrics().values())] if m.main_table},
            # the registry tasks of eval.tasks beyond the suite: each metric (metric,filter)
            **{f"extra:{t}:{k}": metrics["extra_tasks"][t][k]
               for t, keys in extra_metric_keys(metrics).items() for k in keys},
            **{f"extra:{t}:{k.replace(',', '_stderr,', 1)}": metrics["extra_tasks"][t].get(k.replace(",", "_stderr,", 1))
               for t, keys in extra_metric_keys(metrics).items() for k in keys},
            "total": None,  # the base model has no adapter
            "activated": None,
            "router": None,
            "train_s": math.nan,
            "cache_build_s": 0.0,
            "eval_s": (metrics.get("timing") or {}).get("wall_s", math.nan),
            "final_loss": math.nan,
            **{f"cost:{k}": None for k in COST_FIELDS},
        }
        if not run.is_base:
            train = _read_json_named(run_dir / "train.json")
            all_train[run.run_id] = train
            params = train.get("params") or {}
            row.update(
                {
                    "total": params.get("total"),
                    "activated": params.get("activated"),
                    "router": params.get("router"),
                    "train_s": train_seconds(train) + component_seconds(plan, run),
                    "cache_build_s": (train.get("timing") or {}).get("cache_build_s", 0.0),
                    "final_loss": train.get("final_loss", math.nan),
                    **{f"cost:{k}": (train.get("cost") or {}).get(k) for k in COST_FIELDS},
                }
            )
            if logs:
                records = _read_log(run_dir / "train_log.jsonl")
                for rec in records:
                    curves.append({**ident, "step": rec["step"], "loss": rec.get("loss")})
                last = next((r for r in reversed(records) if r.get("expert_load")), None)
                if last is not None:
                    for layer, shares in last["expert_load"].items():
                        order = np.argsort(-np.asarray(shares, dtype=float), kind="stable")
                        position = np.empty(len(shares), dtype=int)
                        position[order] = np.arange(len(shares))
                        for expert, share in enumerate(shares):
                            loads.append(
                                {
                                    **ident,
                                    "step": last["step"],
                                    "layer": layer,
                                    "expert": expert,
                                    "share": float(share),
                                    "order": int(position[expert]),
                                }
                            )
        rows.append(row)
    runs = pd.DataFrame.from_records(rows)
    for col in ("total", "activated", "router", "effective_experts", "experts_per_token",
                "general_word_ppl", *[f"cost:{k}" for k in COST_FIELDS]):
        runs[col] = pd.to_numeric(runs[col])
    base_ppl = runs.loc[runs["method"] == "base", "general_word_ppl"].dropna()
    # forgetting: the general text's word perplexity relative to the untrained model's, - 1
    runs["forgetting"] = (
        runs["general_word_ppl"] / float(base_ppl.iloc[0]) - 1 if len(base_ppl) else math.nan
    )
    curve_cols = ["run_id", "key", "method", "variant", "granularity", "seed", "step", "loss"]
    curves_df = pd.DataFrame.from_records(curves, columns=curve_cols)
    if len(curves_df):
        curves_df = curves_df.drop_duplicates(["run_id", "step"], keep="last")
    load_cols = [*curve_cols[:6], "step", "layer", "expert", "share", "order"]
    builds = float(runs["cache_build_s"].fillna(0).sum()) if "cache_build_s" in runs else 0.0
    for component in plan.components:
        path = plan.run_dir(component) / "train.json"
        if path.exists():
            builds += (_read_json_named(path).get("timing") or {}).get("cache_build_s", 0.0)
    return StudyResults(
        plan=plan,
        runs=runs,
        tasks=tasks,
        curves=curves_df,
        loads=pd.DataFrame.from_records(loads, columns=load_cols),
        metrics=all_metrics,
        train=all_train,
        cache_build_s=builds,
        baselines=_baselines(plan),
        routing=all_routing,
        families=_families(plan),
        with_samples=with_samples,
    )


def _families(plan: StudyPlan) -> dict[str, str] | None:
    path = plan.out_dir / "data" / "data_summary.json"
    if not path.exists():
        return None
    return _read_json_named(path).get("families") or None


def _baselines(plan: StudyPlan) -> dict[str, dict[str, float]]:
    path = plan.out_dir / "data" / "data_summary.json"
    if not path.exists():
        return {}
    summary = _read_json_named(path)
    return {
        "majority": summary.get("majority_share") or {},
        "chance": summary.get("chance") or {},
    }


