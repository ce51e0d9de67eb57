"""The per-run summary table: one row per run with its scores, parameters and times (CSV and
Markdown), from the one results reader (:func:`harness.analysis.results.collect_results`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.analysis.results import collect_results
from harness.common.files import atomic_write_text


def _column(name: str) -> str:
    if name.startswith("metric:"):
        return name.removeprefix("metric:")
    if name.startswith("acc:"):  # the task's primary metric (acc or acc_norm)
        return "score_" + name.removeprefix("acc:")
    if name.startswith("suite:"):  # a secondary metric's suite mean: suite_brier_score
        return "suite_" + name.removeprefix("suite:")
    if name.startswith("cost:"):  # measured while training: tokens_per_s, peak_rss_mib, ...
        return name.removeprefix("cost:")
    if name.startswith("lm:"):  # lm-eval's own: acc_<task>, acc_norm_stderr_<task>, ...
        _, metric, task = name.split(":", 2)
        return f"{metric}_{task}"
    if name.startswith("extra:"):  # a registry task of eval.tasks: exact_match_strict-match_gsm8k
        _, task, key = name.split(":", 2)
        metric, _, filter_ = key.partition(",")
        return f"{metric}_{task}" if filter_ in ("", "none") else f"{metric}_{filter_}_{task}"
    return name


def summary_frame(plan) -> pd.DataFrame:
    """``run_id, method, variant, granularity, seed, suite_acc``, the methods' scalar
    evaluation metrics (e.g. ``router_accuracy``; only columns some run reports),
    ``score_<task>`` per task (its primary metric, the one the suite averages), then
    lm-eval's ``<metric>_<task>`` and ``<metric>_stderr_<task>`` for every registered task
    metric (acc, acc_norm, brier_score) and every metric computed from stored samples (ece),
    ``suite_<metric>`` (a secondary metric's suite mean), for each registry task of
    ``eval.tasks`` beyond the suite every metric lm-eval reported and its stderr
    (``<metric>_<task>``, or ``<metric>_<filter>_<task>`` for a filter other than ``none``:
    ``exact_match_strict-match_gsm8k``), ``general_word_ppl`` and ``forgetting`` (the general text's word perplexity, and
    its ratio to the untrained model's minus 1), the measured cost (``tokens_per_s``,
    ``peak_rss_mib``, ``cuda_max_allocated_mib``, ``estimated_allocated_mib``,
    ``adapter_bytes``), and ``total, activated, router, final_loss, train_s, eval_s``. A
    column no run reports is left out."""
    runs = collect_results(plan).runs.drop(columns=["key"])
    optional = [
        c for c in runs
        if c.startswith(("metric:", "lm:", "suite:", "cost:", "extra:"))
        or c in ("experts_per_token", "general_word_ppl", "forgetting")
    ]
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
