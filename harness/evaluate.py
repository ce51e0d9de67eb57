"""Evaluating one run with lm-eval (the evaluator of record) and keeping lm-eval's own results.

``lm_eval.simple_evaluate`` scores the run's model (:class:`harness.lm_model.HarnessLM`)
on the suite's task folder (written by the data step) plus any lm-eval registry
tasks in ``eval.tasks``. The run folder keeps lm-eval's results JSON unchanged
(``lm_eval_results.json``: its config, versions and per-task metrics) and a small
``metrics.json`` with the numbers the tables use.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from harness.io import atomic_write_json, atomic_write_text

SUITE_PREFIX = "moelora"
SUITE_GROUP = f"{SUITE_PREFIX}_suite"


def suite_task_names(data_dir: Path) -> tuple[str, list[str]]:
    """The group name and the task names the data step wrote (from data_summary.json)."""
    from harness.io import read_json

    summary = read_json(data_dir / "data_summary.json")
    return summary["group"], list(summary["tasks"])


def evaluate_run(config: dict[str, Any], run, run_dir: Path, progress: bool = True) -> dict[str, Any]:
    import json

    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable

    from harness.lm_model import HarnessLM
    from harness.provenance import provenance
    from harness.run_model import write_run_spec

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
    load_s = time.perf_counter() - wall
    extra = list(eval_cfg.get("tasks") or [])
    manager = TaskManager(include_path=str(data_dir / "tasks"), include_defaults=bool(extra))
    t0 = time.perf_counter()
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=[group, *extra],
        task_manager=manager,
        limit=eval_cfg.get("limit"),
        log_samples=False,
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
        verbosity="WARNING",
    )
    eval_s = time.perf_counter() - t0
    atomic_write_text(
        run_dir / "lm_eval_results.json",
        json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False) + "\n",
    )
    per_task = {}
    for name in task_names:
        r = results["results"][name]
        per_task[name.removeprefix(f"{SUITE_PREFIX}_")] = {
            "acc": r["acc,none"],
            "acc_stderr": r.get("acc_stderr,none"),
        }
    suite = results["groups"][group]["acc,none"] if group in results.get("groups", {}) else None
    extra_scores = {
        name: {k: v for k, v in results["results"][name].items() if isinstance(v, (int, float))}
        for name in extra
        if name in results["results"]
    }
    metrics = {
        "run_id": run.run_id,
        "method": run.method,
        "variant": run.tag,
        "granularity": run.granularity,
        "seed": run.seed,
        "suite_acc": suite,
        "tasks": per_task,
        "extra_tasks": extra_scores,
        "lm_eval_version": lm_eval.__version__,
        "timing": {
            "model_load_s": round(load_s, 3),
            "lm_eval_s": round(eval_s, 3),
            "wall_s": round(time.perf_counter() - wall, 3),
        },
        "provenance": provenance(),
    }
    atomic_write_json(run_dir / "metrics.json", metrics)
    return metrics
