"""Evaluating one run with lm-eval (the evaluator of record) and keeping lm-eval's own results.

``lm_eval.simple_evaluate`` scores the run's model (:class:`harness.lm_model.HarnessLM`)
on the suite's task folder (written by the data step) plus any lm-eval registry
tasks in ``eval.tasks``. The run folder keeps lm-eval's results JSON unchanged
(``lm_eval_results.json``: its config, versions and per-task metrics), a small
``metrics.json`` with the numbers the tables use and, for a routed method,
``routing.json``: which experts each task's scored sequences used, per adapted module
(recorded while lm-eval scored, :class:`harness.adapters.routing.RoutingRecord`).
``metrics.json`` gets the effective number of experts from it (``exp`` of the entropy
of each module's expert distribution, averaged over modules) and the method's own
numbers (``method_metrics``, e.g. a router's accuracy at picking the task's adapter).

With ``data.source: lm_eval`` there is no suite task folder (the data summary has
group ``None`` and no tasks): the run is scored on ``eval.tasks`` alone, looked up
in lm-eval's registry (and ``data.include_path``); each of them is a per-task
column and ``suite_acc`` is the unweighted mean of their ``acc``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable

from harness.adapters.routing import RoutingRecord
from harness.io import atomic_write_json, atomic_write_text, read_json
from harness.lm_model import HarnessLM
from harness.provenance import provenance
from harness.run_model import write_run_spec
from harness.status import test_data_digest

SUITE_PREFIX = "moelora"
SUITE_GROUP = f"{SUITE_PREFIX}_suite"


def suite_task_names(data_dir: Path) -> tuple[str, list[str]]:
    """The group name and the task names the data step wrote (from data_summary.json)."""
    summary = read_json(data_dir / "data_summary.json")
    return summary["group"], list(summary["tasks"])


def item_scores(samples: list[dict[str, Any]]) -> dict[str, str]:
    """Per-item ``acc`` and ``acc_norm`` of one task as strings of 0/1 in doc order (compact:
    the bootstrap over test items reads them)."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    out = {}
    for metric in ("acc", "acc_norm"):
        if ordered and metric in ordered[0]:
            out[metric] = "".join("1" if float(s[metric]) >= 0.5 else "0" for s in ordered)
    return out


#: where the training job leaves the scores it computed right after training; the evaluate
#: rule moves them into place instead of starting a process to compute them again
PENDING = {"metrics.json": "metrics.pending.json", "lm_eval_results.json": "lm_eval_results.pending.json"}


def evaluate_run(
    config: dict[str, Any], run, run_dir: Path, progress: bool = True, pending: bool = False
) -> dict[str, Any]:
    """Score ``run`` with lm-eval and write ``lm_eval_results.json``, ``metrics.json`` and
    (routed methods) ``routing.json`` into ``run_dir``; returns the metrics. ``pending``: the
    training job scoring its run at once writes the first two under :data:`PENDING` names."""
    names = PENDING if pending else {k: k for k in PENDING}
    wall = time.perf_counter()
    eval_cfg = config["eval"]
    data_dir = Path(config["out_dir"]) / "data"
    group, task_names = suite_task_names(data_dir)
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
        from harness.data.lm_eval_train import task_manager

        if not extra:
            raise ValueError(
                "data.source lm_eval writes no suite task folder: list the lm-eval tasks to "
                "score in eval.tasks"
            )
        manager = task_manager(extra, config["data"].get("include_path"))
        requested = extra
    else:
        manager = TaskManager(include_path=str(data_dir / "tasks"), include_defaults=bool(extra))
        requested = [group, *extra]
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=requested,
        task_manager=manager,
        limit=eval_cfg.get("limit"),
        log_samples=True,  # per-item scores for the bootstrap; not stored whole (size)
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
        verbosity="WARNING",
    )
    eval_s = time.perf_counter() - t0
    samples = results.pop("samples", {})
    atomic_write_text(
        run_dir / names["lm_eval_results.json"],
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
    )
    summary = read_json(data_dir / "data_summary.json")
    primary = summary.get("primary_metric") or {}
    short = {name: name.removeprefix(f"{SUITE_PREFIX}_") for name in task_names}
    columns = {short[n]: n for n in task_names} if group is not None else {n: n for n in extra}
    per_task = {}
    for task, name in columns.items():
        r = results["results"][name]
        metric = primary.get(task) or ("acc_norm" if "acc_norm,none" in r else "acc")
        per_task[task] = {
            "acc": r["acc,none"],
            "acc_stderr": r.get("acc_stderr,none"),
            "acc_norm": r.get("acc_norm,none"),
            "acc_norm_stderr": r.get("acc_norm_stderr,none"),
            "primary": metric,
            "score": r[f"{metric},none"],
        }
    # the suite: every task weighs the same, each by its primary metric
    suite = sum(v["score"] for v in per_task.values()) / len(per_task)
    items = {task: item_scores(samples.get(name, [])) for task, name in columns.items()}
    extra_scores = {
        name: {k: v for k, v in results["results"][name].items() if isinstance(v, (int, float))}
        for name in extra
        if name in results["results"]
    }
    routing = lm.routing_record()
    method_metrics: dict[str, Any] = {}
    if routing is not None:
        routing = RoutingRecord(
            shares={m: {short.get(t, t): v for t, v in by_task.items()} for m, by_task in routing.shares.items()},
            sequences={short.get(t, t): n for t, n in routing.sequences.items()},
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
        "test_data": test_data_digest(config),
        "effective_experts": None if routing is None else round(routing.effective_experts(), 4),
        "method_metrics": method_metrics,
        "tasks": per_task,
        "items": items,
        "extra_tasks": extra_scores,
        "lm_eval_version": lm_eval.__version__,
        "timing": {
            "model_load_s": round(load_s, 3),
            "lm_eval_s": round(eval_s, 3),
            "wall_s": round(time.perf_counter() - wall, 3),
        },
        "provenance": provenance(),
    }
    atomic_write_json(run_dir / names["metrics.json"], metrics)
    return metrics
