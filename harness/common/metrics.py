"""The metrics the harness reports, each declared once (lm-eval's registry style): name,
how one test item's value is read from lm-eval's logged samples, aggregation,
higher-is-better, unit and label (:class:`harness.adapters.metrics.Metric`).

Everything downstream reads this table: the data step lists the lm-eval metrics in every
task YAML (:func:`task_metrics`), evaluation stores each task's values and per-item values
(:func:`item_values`), the results reader, summary and main table add a column per
metric, the significance machinery resamples per-item values, and the primary metric of a
task follows its answer form (:func:`primary_for`). A new metric is one entry here (and a
test); a method's own metrics are declared on the method (``Method.metrics``) and added by
:func:`register_method_metrics` when a study is planned.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from harness.adapters.metrics import Metric


def _binary(name: str):
    def read(sample: dict[str, Any]) -> float:
        return 1.0 if float(sample[name]) >= 0.5 else 0.0

    read.__name__ = f"read_{name}"
    return read


def brier_item(sample: dict[str, Any]) -> float:
    """One item's Brier score from lm-eval's ``brier_score`` sample value ``(gold, p)``:
    ``sum_c (p_c - [c = gold])^2`` with ``p`` the softmax of the choices' log-likelihoods
    (lm-eval's ``brier_score`` aggregation is the mean of this over the items)."""
    gold, probs = sample["brier_score"]
    return float(sum((float(p) - (1.0 if c == int(gold) else 0.0)) ** 2 for c, p in enumerate(probs)))


BUILTIN: tuple[Metric, ...] = (
    Metric("acc", "accuracy", lm_eval=True, item=_binary("acc"), binary=True, primary_for="words"),
    Metric(
        "acc_norm", "length-normalised accuracy", lm_eval=True, item=_binary("acc_norm"),
        binary=True, primary_for="phrases",
    ),
    # lm-eval's Brier score of the choice distribution (Brier 1950): lower is better,
    # 0 for a confident right answer, 2 for a confident wrong one
    Metric(
        "brier_score", "Brier score", unit="score", higher_is_better=False, decimals=3,
        lm_eval=True, item=brier_item, aggregation="brier_score", uniform_choices=True,
        main_table=True,
    ),
    # lm-eval's exact match of a generate_until task (harness.data.generation): 1 when the
    # generated answer, whitespace stripped, equals the item's answer
    Metric(
        "exact_match", "exact match", lm_eval=True, item=_binary("exact_match"), binary=True,
        primary_for="generation",
    ),
)

#: metrics of generate_until tasks (the others are multiple_choice metrics)
GENERATION_METRICS = ("exact_match",)

_registry: dict[str, Metric] = {m.name: m for m in BUILTIN}


def metric(name: str) -> Metric:
    """The declaration of ``name``; an undeclared name (a plugin's number without a
    declaration) is shown as a plain score, neither better when higher nor lower."""
    return _registry.get(name) or Metric(name, name.replace("_", " "), unit="score",
                                          higher_is_better=None, decimals=3)


def task_metrics() -> list[Metric]:
    """The per-task metrics lm-eval computes, in declaration order."""
    return [m for m in _registry.values() if m.lm_eval]


def metrics_for(items: Iterable[dict[str, Any]]) -> list[Metric]:
    """The task metrics that apply to one task's items (``uniform_choices``: only when every
    item has the same number of choices, else lm-eval could not aggregate it)."""
    items = list(items)
    if items and all("choices" not in it and "answer" in it for it in items):  # generation items
        return [m for m in task_metrics() if m.name in GENERATION_METRICS]
    counts = {len(it["choices"]) for it in items}
    return [m for m in task_metrics()
            if m.name not in GENERATION_METRICS and (not m.uniform_choices or len(counts) == 1)]


def primary_for(items: list[dict[str, Any]]) -> str:
    """The metric a task is reported with, by its answer form: ``words`` when every choice is
    one word (log-likelihoods compare like with like), else ``phrases`` (lm-eval's
    length-normalised accuracy, its convention for ARC, OpenBookQA, PIQA, HellaSwag)."""
    if items and all("choices" not in it and "answer" in it for it in items):
        form = "generation"  # a generate_until task's items: exact match
    else:
        form = "words" if all(len(c.split()) == 1 for it in items for c in it["choices"]) else "phrases"
    return next(m.name for m in task_metrics() if m.primary_for == form)


def item_values(metric_: Metric, samples: list[dict[str, Any]]) -> str | list[float] | None:
    """Per-item values of one task in doc order: a string of 0/1 for a binary metric (compact),
    else a list of floats; ``None`` when the samples do not hold the metric."""
    ordered = sorted(samples, key=lambda s: s["doc_id"])
    if metric_.item is None or not ordered or metric_.name not in ordered[0]:
        return None
    values = [metric_.item(s) for s in ordered]
    if metric_.binary:
        return "".join("1" if v >= 0.5 else "0" for v in values)
    return [round(v, 6) for v in values]


def per_item(stored: str | list[float]) -> list[float]:
    """Stored per-item values (a bit string or a list) as floats."""
    return [float(b) for b in stored]


def register_method_metrics(metrics: Iterable[Metric]) -> None:
    """Add a method's declared metrics (a plugin may not redefine a built-in one)."""
    for m in metrics:
        if m.name in {b.name for b in BUILTIN} and _registry[m.name] is not m:
            raise ValueError(f"metric {m.name!r} is built in; a method cannot redeclare it")
        _registry[m.name] = m


def registered() -> dict[str, Metric]:
    return dict(_registry)
