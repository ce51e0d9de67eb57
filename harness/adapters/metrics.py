"""Declaring a metric: the one description every stage reads (evaluation, the results reader,
the summary, tables, significance and figures).

Built-in metrics live in :mod:`harness.common.metrics`; a method declares the numbers its
:meth:`~harness.adapters.base.Method.evaluation_metrics` returns in its ``metrics`` class
attribute, so the tables print them in their unit (a share in percent, a count as is)::

    metrics = (Metric("active_experts", "active experts", unit="count", higher_is_better=None),)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

#: how a unit is shown: the factor applied before display, and the suffix
UNITS = {
    "share": (100.0, "%"),  # a fraction in [0, 1], shown in percent
    "count": (1.0, ""),
    "score": (1.0, ""),
    "nats": (1.0, " nats"),
    "ppl": (1.0, ""),
    "bytes": (1.0, " B"),
    "seconds": (1.0, " s"),
}


@dataclass(frozen=True)
class Metric:
    """One metric, declared once.

    * ``name``: its key in lm-eval's results (``acc``) or in a method's ``evaluation_metrics``;
    * ``label``: how tables and figures name it;
    * ``unit``: one of :data:`UNITS` (``share``: a fraction shown in percent);
    * ``higher_is_better``: ``True``/``False``, or ``None`` when neither (a diagnostic);
    * ``decimals``: shown after the unit's factor;
    * ``lm_eval``: lm-eval computes it (the task YAMLs list it in ``metric_list``);
    * ``item``: how one test item's value is read from an lm-eval logged sample (``None``:
      no per-item value); ``binary``: per-item values are 0/1 (stored as a bit string);
    * ``aggregation``: lm-eval's aggregation of the metric (``mean``; the Brier score has its
      own); the harness's per-item values always average to the task's value;
    * ``primary_for``: the answer form it is the primary metric of (``words``: every choice
      one word; ``phrases``: choices of different lengths), else ``None``;
    * ``uniform_choices``: lm-eval can aggregate it only when every item of a task has the
      same number of choices (the Brier score);
    * ``main_table``: the main table shows its suite mean beside the primary score.
    """

    name: str
    label: str
    unit: str = "share"
    higher_is_better: bool | None = True
    decimals: int = 1
    lm_eval: bool = False
    item: Callable[[dict[str, Any]], float] | None = None
    binary: bool = False
    aggregation: str = "mean"
    primary_for: str | None = None
    uniform_choices: bool = False
    main_table: bool = False

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"metric {self.name!r}: unit {self.unit!r}; valid: {', '.join(UNITS)}")

    @property
    def scale(self) -> float:
        return UNITS[self.unit][0]

    def show(self, value: Any) -> str:
        """``value`` as the tables print it (``–`` when missing)."""
        try:
            v = float(value)
        except (TypeError, ValueError):
            return "–"
        if v != v:  # NaN
            return "–"
        return f"{v * self.scale:.{self.decimals}f}"
