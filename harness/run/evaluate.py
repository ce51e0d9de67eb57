"""Evaluating one run with lm-eval (the evaluator of record) and keeping lm-eval's own results.

``lm_eval.simple_evaluate`` scores the run's model (:class:`harness.model.lm_eval_model.HarnessLM`)
on the suite's task folder (written by the data step) plus any lm-eval registry
tasks in ``eval.tasks``. The run folder keeps lm-eval's results JSON unchanged
(``lm_eval_results.json``: its config, versions and per-task metrics), a small
``metrics.json`` with the numbers the tables use and, for a routed method,
``routing.json``: which experts each task's scored sequences used, per adapted module
(recorded while lm-eval scored, :class:`harness.adapters.routing.RoutingRecord`).
``metrics.json`` gets the effective number of experts from it (``exp`` of the entropy
of each module's expert distribution, averaged over modules) and the method's own
numbers (``method_metrics``, e.g. a router's accuracy at picking the task's adapter).

Every item's prediction is kept in ``samples.json`` (:data:`harness.common.metrics.SAMPLES_FILE`:
the choices' log-likelihoods of a multiple-choice item, the generated text of a generation
item, per lm-eval filter), so a metric added later is computed from it without scoring
again (:func:`harness.common.metrics.register_metric`). The extra registry tasks of
``eval.tasks`` keep their per-item values too (``extra_items``, keyed as lm-eval keys its
results: ``metric,filter``, e.g. gsm8k's ``exact_match,strict-match`` and
``exact_match,flexible-extract``) for every metric lm-eval aggregates as their mean, and
lm-eval's direction of each metric (``extra_higher_is_better``).

With ``data.source: lm_eval`` there is no suite task folder (the data summary has
group ``None`` and no tasks): the run is scored on ``eval.tasks`` alone, looked up
in lm-eval's registry (and ``data.include_path``); each of them is a per-task
column and ``suite_acc`` is the unweighted mean of their ``acc``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

from harness.adapters.routing import RoutingRecord
from harness.common.files import atomic_write_json, atomic_write_text, read_json
from harness.common.manifest import record_files, verify_data
from harness.common.metrics import (
    SAMPLES_FILE,
    SAMPLES_FORMAT,
    item_values,
    registered,
    stored_samples,
    task_metrics,
)
from harness.common.provenance import provenance
from harness.data.lm_eval_tasks import verify_task_folder
from harness.data.lm_eval_train import task_manager
from harness.data.tasks import test_data_digest
from harness.model.lm_eval_model import HarnessLM
from harness.model.run_folder import write_run_spec

SUITE_PREFIX = "moelora"
SUITE_GROUP = f"{SUITE_PREFIX}_suite"


def suite_task_names(data_dir: Path) -> tuple[str, list[str]]:
    """The group name and the task names the data step wrote (from data_summary.json)."""
    summary = read_json(data_dir / "data_summary.json")
    return summary["group"], list(summary["tasks"])


def item_filter(samples: list[dict[str, Any]]) -> str:
    """The lm-eval filter a task's primary per-item values come from: ``none`` (a task without
    a filter list), else its first filter (a registry task's, e.g. gsm8k's ``strict-match``)."""
    filters = [str(s.get("filter", "none")) for s in sorted(samples, key=lambda s: s["doc_id"])]
    return "none" if "none" in filters or not filters else filters[0]


def item_scores(samples: list[dict[str, Any]]) -> dict[str, str | list[float]]:
    """Per-item values of one task in doc order, for every registered task metric its samples
    hold (:func:`harness.common.metrics.item_values`: a string of 0/1 for ``acc`` and
    ``acc_norm``, compact; a list of floats otherwise), from one filter (:func:`item_filter`).
    The bootstrap over test items reads them."""
    chosen = item_filter(samples)
    samples = [s for s in samples if str(s.get("filter", "none")) == chosen]
    out = {}
    for m in task_metrics():
        values = item_values(m, samples)
        if values is not None:
            out[m.name] = values
    return out


def _scalar(value: Any) -> float | None:
    """A per-item value as a float, or ``None`` when it is not one number (lm-eval keeps pairs
    for corpus metrics such as f1, BLEU or perplexity)."""
    if isinstance(value, (str, bytes, list, tuple, dict)) or hasattr(value, "__len__"):
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def extra_item_scores(result: dict[str, Any], samples: list[dict[str, Any]]) -> dict[str, str | list[float]]:
    """Per-item values of one registry task of ``eval.tasks``, in doc order, keyed as lm-eval
    keys its results (``metric,filter``): every metric of every filter whose per-item values
    average to the value lm-eval reported (its aggregation is the mean; a corpus metric such as
    f1, BLEU or a perplexity has no per-item value and is left out). A registered metric is
    read with its declared reader (the Brier score); 0/1 values are kept as a bit string."""
    declared = registered()
    by_filter: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        by_filter.setdefault(str(s.get("filter", "none")), []).append(s)
    out: dict[str, str | list[float]] = {}
    for filter_, group in by_filter.items():
        for name in group[0].get("metrics") or []:
            key = f"{name},{filter_}"
            reported = _scalar(result.get(key))
            m = declared.get(name)
            try:
                values = [m.item(s) if m is not None and m.item is not None else _scalar(s.get(name)) for s in group]
            except (KeyError, TypeError, ValueError, IndexError):
                continue
            if reported is None or any(v is None for v in values):
                continue
            if not math.isclose(sum(values) / len(values), reported, rel_tol=1e-6, abs_tol=1e-9):
                continue  # not the mean of per-item values
            if all(v in (0.0, 1.0) for v in values):
                out[key] = "".join("1" if v else "0" for v in values)
            else:
                out[key] = [round(float(v), 6) for v in values]
    return out


def task_values(result: dict[str, Any]) -> dict[str, Any]:
    """Every registered task metric lm-eval reported for one task, with its stderr."""
    out: dict[str, Any] = {}
    for m in task_metrics():
        if f"{m.name},none" in result:
            out[m.name] = result[f"{m.name},none"]
            stderr = result.get(f"{m.name}_stderr,none")
            out[f"{m.name}_stderr"] = stderr if isinstance(stderr, (int, float)) else None
    return out


def general_text_scores(result: dict[str, Any] | None, samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    """lm-eval's word perplexity, byte perplexity and bits per byte of the general text, and
    per document its loss per word (nats, ``-loglikelihood / words``) and its words: the
    forgetting comparisons resample documents with their words as weights, so the weighted
    mean loss per word is ``ln(word perplexity)``."""
    if result is None:
        return None
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    pairs = [s["word_perplexity"] for s in ordered]
    return {
        "word_perplexity": result.get("word_perplexity,none"),
        "byte_perplexity": result.get("byte_perplexity,none"),
        "bits_per_byte": result.get("bits_per_byte,none"),
        "items": {
            "nll_per_word": [round(-float(ll) / int(words), 8) for ll, words in pairs],
            "words": [int(words) for _, words in pairs],
        },
    }


def evaluate_run(
    config: dict[str, Any], run, run_dir: Path, progress: bool = True
) -> dict[str, Any]:
    """Score ``run`` with lm-eval and write ``lm_eval_results.json``, ``metrics.json`` and
    (routed methods) ``routing.json`` into ``run_dir``; returns the metrics."""
    wall = time.perf_counter()
    eval_cfg = config["eval"]
    data_dir = Path(config["out_dir"]) / "data"
    tuning = getattr(run, "split", "main") == "tune"
    # never scored on: a data file that differs from what the data step recorded
    data_inputs = verify_data(data_dir, ["data_summary.json", "tune/tasks/" if tuning else "tasks/"],
                              affects=f"run {run.run_id}")
    summary = read_json(data_dir / "data_summary.json")
    if tuning:  # a tune-stage run: scored on the validation split only (no extra tasks)
        group, task_names = summary["tune"]["group"], list(summary["tune"]["tasks"])
        tasks_dir = data_dir / "tune" / "tasks"
        eval_cfg = {**eval_cfg, "tasks": [], "include_path": None}
    else:
        group, task_names = summary["group"], list(summary["tasks"])
        tasks_dir = data_dir / "tasks"
    write_run_spec(config, run, run_dir)
    lm = HarnessLM(
        run_dir=str(run_dir),
        batch_size=eval_cfg["batch_size"],
        threads=config["train"]["threads"],
    )
    lm.record_routing = True
    load_s = time.perf_counter() - wall
    extra = list(eval_cfg.get("tasks") or [])
    if group is None:  # data.source lm_eval: the registry tasks of eval.tasks are the suite

        if not extra:
            raise ValueError(
                "data.source lm_eval writes no suite task folder: list the lm-eval tasks to "
                "score in eval.tasks"
            )
        manager = task_manager(extra, config["data"].get("include_path"))
        requested = extra
    else:
        verify_task_folder(tasks_dir)  # nothing in it can make lm-eval run code
        paths = [str(tasks_dir), *([str(eval_cfg["include_path"])] if eval_cfg.get("include_path") else [])]
        manager = TaskManager(include_path=paths, include_defaults=bool(extra))
        requested = [group, *extra]
    general = None if tuning else (summary.get("general_text") or {}).get("task")
    if general:
        requested.append(general)
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=requested,
        task_manager=manager,
        limit=eval_cfg.get("limit"),
        log_samples=True,  # per-item scores and predictions (samples.json), not the documents
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
        verbosity="WARNING",
    )
    eval_s = time.perf_counter() - t0
    samples = results.pop("samples", {})
    atomic_write_text(
        run_dir / "lm_eval_results.json",
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
    )
    primary = summary.get("primary_metric") or {}
    short = {name: name.removeprefix(f"{SUITE_PREFIX}_") for name in task_names}
    columns = {short[n]: n for n in task_names} if group is not None else {n: n for n in extra}
    per_task = {}
    for task, name in columns.items():
        r, filter_ = results["results"][name], item_filter(samples.get(name, []))
        metric = primary.get(task) or next(
            (m for m in ("acc_norm", "acc", "exact_match") if f"{m},{filter_}" in r), "acc")
        per_task[task] = {**task_values(r), "primary": metric, "score": r[f"{metric},{filter_}"]}
    # the suite: every task weighs the same, each by its primary metric
    suite = sum(v["score"] for v in per_task.values()) / len(per_task)
    items = {task: item_scores(samples.get(name, [])) for task, name in columns.items()}
    extra_scores = {
        name: {k: v for k, v in results["results"][name].items() if isinstance(v, (int, float))}
        for name in extra
        if name in results["results"]
    }
    # the registry tasks beyond the suite: their per-item values and lm-eval's directions
    beyond = [name for name in extra_scores if name not in columns.values()]
    extra_items = {name: extra_item_scores(results["results"][name], samples.get(name, [])) for name in beyond}
    extra_direction = {name: dict((results.get("higher_is_better") or {}).get(name) or {}) for name in beyond}
    output_types = {name: (cfg or {}).get("output_type") for name, cfg in (results.get("configs") or {}).items()}
    atomic_write_text(run_dir / SAMPLES_FILE, json.dumps({
        "format": SAMPLES_FORMAT,
        "run_id": run.run_id,
        "tasks": {task: stored_samples(output_types.get(name), samples.get(name, [])) for task, name in columns.items()},
        "extra_tasks": {name: stored_samples(output_types.get(name), samples.get(name, [])) for name in beyond},
    }, ensure_ascii=False, default=handle_non_serializable) + "\n")
    general_text = general_text_scores(results["results"].get(general), samples.get(general, [])) if general else None
    routing = lm.routing_record()
    method_metrics: dict[str, Any] = {}
    if routing is not None:
        routing = RoutingRecord(
            shares={m: {short.get(t, t): v for t, v in by_task.items()} for m, by_task in routing.shares.items()},
            sequences={short.get(t, t): n for t, n in routing.sequences.items()},
            active={m: {short.get(t, t): v for t, v in by_task.items()} for m, by_task in (routing.active or {}).items()},
        )
        atomic_write_json(
            run_dir / "routing.json",
            {"run_id": run.run_id, "sequences": routing.sequences, "shares": routing.shares},
        )
        handle = lm.run.handle
        method_metrics = handle.method.evaluation_metrics(handle.config, routing)
    metrics = {
        "run_id": run.run_id,
        "method": run.method,
        "variant": run.tag,
        "granularity": run.granularity,
        "seed": run.seed,
        "suite_acc": suite,
        "suite_metric": "mean over tasks of each task's primary metric (acc or acc_norm)",
        # a tune-stage run's validation items are part of its id; the test items are not
        "test_data": None if tuning else test_data_digest(config),
        "inputs": {"data": data_inputs},  # the data files it was scored on, verified (sha256)
        "effective_experts": None if routing is None else round(routing.effective_experts(), 4),
        "experts_per_token": None if routing is None else round(routing.experts_per_token(), 4),
        "general_text": general_text,
        "method_metrics": method_metrics,
        "tasks": per_task,
        "items": items,
        "extra_tasks": extra_scores,
        "extra_items": extra_items,
        "extra_higher_is_better": extra_direction,
        "lm_eval_version": lm_eval.__version__,
        "timing": {
            "model_load_s": round(load_s, 3),
            "lm_eval_s": round(eval_s, 3),
            "wall_s": round(time.perf_counter() - wall, 3),
        },
        "provenance": provenance(),
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    record_files(run_dir, [n for n in ("metrics.json", "lm_eval_results.json", "routing.json", SAMPLES_FILE)
                           if (run_dir / n).is_file()])
    return metrics
