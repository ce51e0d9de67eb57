"""Where the experts go: how much tasks share experts, within a task family and across.

Every routed run's evaluation records, per adapted module and per task, the mean share of
each expert over the task's scored sequences (``routing.json``, from the routing record the
evaluation keeps while lm-eval scores). For two tasks with expert distributions ``p`` and
``q`` in one module, their **overlap** is the histogram intersection

    overlap(p, q) = sum_e min(p_e, q_e)        (1: the same experts in the same shares,
                                                0: no expert in common)

For each run: the mean overlap over the modules and over the pairs of tasks of the same
family (``within``) and of different families (``across``); the tables and figures show
the mean over seeds. A mixture that keeps conflicting tasks apart and lets related ones
share has ``within > across``; the SMoRA paper's claim is that finer experts allow more of
that. Families come from the data (the generated suite's ``nature`` and ``artifact``
families; ``data_summary.json``'s ``families``); without them only the overlap over all
task pairs is reported.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import pandas as pd


def overlap(p: list[float], q: list[float]) -> float:
    """Histogram intersection ``sum_e min(p_e, q_e)`` of two expert distributions."""
    return float(np.minimum(np.asarray(p, dtype=float), np.asarray(q, dtype=float)).sum())


def run_sharing(routing: dict[str, Any], families: dict[str, str] | None) -> dict[str, float]:
    """``within``, ``across`` (family pairs; NaN without families or such pairs) and
    ``all_pairs`` overlap of one run, each the mean over modules and task pairs."""
    within, across, every = [], [], []
    for by_task in routing["shares"].values():
        tasks = sorted(by_task)
        for a, b in itertools.combinations(tasks, 2):
            value = overlap(by_task[a], by_task[b])
            every.append(value)
            if families and a in families and b in families:
                (within if families[a] == families[b] else across).append(value)
    mean = lambda xs: float(np.mean(xs)) if xs else math.nan  # noqa: E731
    return {"within": mean(within), "across": mean(across), "all_pairs": mean(every)}


def sharing_frame(results) -> pd.DataFrame:
    """One row per routed run with its overlaps (``run_id, key, method, variant, granularity,
    seed, within, across, all_pairs``)."""
    records = []
    families = results.families
    for _, row in results.runs.iterrows():
        routing = results.routing.get(row["run_id"])
        if not routing:
            continue
        records.append(
            {
                **{k: row[k] for k in ("run_id", "key", "method", "variant", "granularity", "seed")},
                **run_sharing(routing, families),
            }
        )
    return pd.DataFrame.from_records(
        records,
        columns=["run_id", "key", "method", "variant", "granularity", "seed", "within", "across", "all_pairs"],
    )


def sharing_table(results) -> pd.DataFrame:
    """Per method x variant (routed): mean over seeds of the within-family, across-family and
    all-pairs overlap, and ``within - across``."""
    frame = sharing_frame(results)
    if frame.empty:
        return frame
    grouped = frame.groupby(["key", "method", "variant", "granularity"], sort=False)
    table = grouped[["within", "across", "all_pairs"]].mean().reset_index()
    table["n_seeds"] = grouped.size().values
    table["within_minus_across"] = table["within"] - table["across"]
    return table


def representative_module(routing: dict[str, Any]) -> str:
    """The module whose all-pairs task overlap is the median over the modules (stated in the
    figure): neither the most nor the least task-specific one."""
    scores = []
    for module, by_task in routing["shares"].items():
        pairs = [overlap(by_task[a], by_task[b]) for a, b in itertools.combinations(sorted(by_task), 2)]
        scores.append((float(np.mean(pairs)) if pairs else 1.0, module))
    scores.sort()
    return scores[len(scores) // 2][1]
