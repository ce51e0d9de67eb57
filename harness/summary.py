"""The per-run summary table: one row per run with its scores, parameters and times (CSV and
Markdown), from the one results reader (:func:`harness.results.collect_results`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.io import atomic_write_text
from harness.results import collect_results


def _column(name: str) -> str:
    if name.startswith("metric:"):
        return name.removeprefix("metric:")
    if name.startswith("acc:"):  # the task's primary metric (acc or acc_norm)
        return "score_" + name.removeprefix("acc:")
    if name.startswith("lm:"):  # lm-eval's own: acc_<task>, acc_norm_stderr_<task>, ...
        _, metric, task = name.split(":", 2)
        return f"{metric}_{task}"
    return name


def summary_frame(plan) -> pd.DataFrame:
    """``run_id, method, variant, granularity, seed, suite_acc``, the methods' scalar
    evaluation metrics (e.g. ``router_accuracy``; only columns some run reports),
    ``score_<task>`` per task (its primary metric, the one the suite averages), then
    lm-eval's ``acc_<task>``, ``acc_stderr_<task>``, ``acc_norm_<task>``,
    ``acc_norm_stderr_<task>``, and ``total, activated, router, final_loss, train_s, eval_s``."""
    runs = collect_results(plan).runs.drop(columns=["key"])
    optional = [c for c in runs if c.startswith(("metric:", "lm:"))]
    runs = runs.drop(columns=[c for c in optional if runs[c].isna().all()])
    runs = runs.rename(columns=_column)
    tail = ["total", "activated", "router", "final_loss", "train_s", "eval_s"]
    head = [c for c in runs if c not in tail]
    return runs[head + tail]


def write_summary(plan, out_dir: Path | None = None) -> pd.DataFrame:
    frame = summary_frame(plan)
    out_dir = Path(out_dir or plan.out_dir)
    atomic_write_text(out_dir / "summary.csv", frame.to_csv(index=False))
    atomic_write_text(out_dir / "summary.md", frame.to_markdown(index=False, floatfmt=".4f") + "\n")
    return frame
