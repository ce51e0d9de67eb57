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

**Metrics from stored samples.** Evaluation keeps every run's per-item predictions in the run
folder (:data:`SAMPLES_FILE`, written by :func:`stored_samples`: the choices'
log-likelihoods of a multiple-choice item, the generated text of a generation item, per
lm-eval filter). A metric computed from them is one function, declared where it is defined
with :func:`register_metric` (lm-eval's ``@register_metric`` style) in a module of
:mod:`harness.analysis.sample_metrics` (every module there is imported with the package);
the results reader computes it for every run that stored samples, without scoring anything
again. Runs evaluated before samples were kept (the committed studies) have no such file:
their tables simply lack these metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
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
    """Add a method's declared metrics (a plugin may not redefine a built-in one, nor one
    computed from stored samples)."""
    for m in metrics:
        taken = m.name in {b.name for b in BUILTIN} or m.name in _from_samples
        if taken and _registry[m.name] is not m:
            raise ValueError(f"metric {m.name!r} is built in; a method cannot redeclare it")
        _registry[m.name] = m


# -- metrics from stored samples ----------------------------------------------------------

#: a run folder's per-item predictions (:func:`stored_samples`), beside ``metrics.json``
SAMPLES_FILE = "samples.json"
SAMPLES_FORMAT = 1


@dataclass(frozen=True)
class FromSamples:
    """How a metric is computed from a run's stored samples: ``compute`` takes one task's
    stored items of one lm-eval filter (:func:`stored_samples`: dicts with ``doc_id`` and,
    for ``multiple_choice``, ``gold``, ``loglikelihoods``, ``is_greedy``; for
    ``generate_until``, ``target``, ``response``, ``raw``) and returns the task's value
    (``per_item=False``: e.g. a calibration error over all items) or, with ``per_item=True``,
    one value per item in the given order (the task's value is their mean, and the
    significance tables resample them). ``output_types``: the lm-eval request types it applies
    to; ``None`` from ``compute`` means "does not apply to these items"."""

    compute: Callable[[list[dict[str, Any]]], Any]
    per_item: bool = False
    output_types: tuple[str, ...] = ("multiple_choice",)


_from_samples: dict[str, FromSamples] = {}


def register_metric(
    declared: Metric, *, per_item: bool = False, output_types: Iterable[str] = ("multiple_choice",)
) -> Callable[[Callable[[list[dict[str, Any]]], Any]], Callable[[list[dict[str, Any]]], Any]]:
    """Declare a metric computed from stored samples where its function is defined::

        @register_metric(Metric("ece", "expected calibration error", unit="score",
                                higher_is_better=False, decimals=3, main_table=True))
        def ece(items): ...

    ``declared`` is the metric's one description (label, unit, direction, whether the main
    table shows its suite mean); it may not reuse a name lm-eval or a method reports."""

    def wrap(compute):
        known = _from_samples.get(declared.name)
        if declared.name in _registry and (known is None or known.compute.__qualname__ != compute.__qualname__):
            raise ValueError(f"metric {declared.name!r} is already declared; pick another name")
        if declared.lm_eval or declared.item is not None:
            raise ValueError(f"metric {declared.name!r}: computed from stored samples, so neither "
                             "lm_eval nor item may be set")
        _registry[declared.name] = declared
        _from_samples[declared.name] = FromSamples(compute, per_item, tuple(output_types))
        return compute

    return wrap


def sample_metrics() -> dict[str, tuple[Metric, FromSamples]]:
    """The metrics computed from stored samples, in registration order (import
    :mod:`harness.analysis.sample_metrics` first: it registers the built-in ones)."""
    return {name: (_registry[name], rule) for name, rule in _from_samples.items()}


def _plain(value: Any) -> Any:
    """A JSON value: numpy scalars as Python numbers, tuples as lists, else ``str``."""
    if isinstance(value, (str, bool, int, float)) or value is None:
        return value
    if hasattr(value, "item") and not hasattr(value, "__len__"):  # a numpy scalar
        return value.item()
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)


def _gold(sample: dict[str, Any]) -> int | None:
    """The index of a multiple-choice item's right choice: lm-eval's ``target`` when it is an
    index, else the choice (continuation) equal to it; ``None`` when neither."""
    target = _plain(sample.get("target"))
    if isinstance(target, int) and not isinstance(target, bool):
        return target
    if isinstance(target, str):
        if target.strip().isdigit():
            return int(target)
        continuations = [str(a[1]).strip() for a in sample.get("arguments") or [] if len(a) > 1]
        if target.strip() in continuations:
            return continuations.index(target.strip())
    return None


def sample_record(output_type: str, sample: dict[str, Any]) -> dict[str, Any]:
    """One lm-eval logged sample as :data:`SAMPLES_FILE` keeps it (its prediction, not the
    document: the test items are in the data folder)."""
    record: dict[str, Any] = {"doc_id": int(sample["doc_id"])}
    resps = sample.get("filtered_resps") or []
    if output_type == "multiple_choice":
        record["gold"] = _gold(sample)
        record["loglikelihoods"] = [float(r[0]) for r in resps]
        record["is_greedy"] = [bool(r[1]) for r in resps]
    elif output_type == "generate_until":
        record["target"] = _plain(sample.get("target"))
        record["response"] = _plain(resps[0]) if resps else None
        raw = sample.get("resps") or []
        record["raw"] = _plain(raw[0][0]) if raw and raw[0] else None
    elif output_type == "loglikelihood":
        record["target"] = _plain(sample.get("target"))
        record["loglikelihood"], record["is_greedy"] = float(resps[0][0]), bool(resps[0][1])
    elif output_type == "loglikelihood_rolling":
        record["loglikelihood"] = float(resps[0]) if resps else None
    else:
        record["filtered_resps"] = _plain(resps)
    return record


def stored_samples(output_type: str | None, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One task's entry of :data:`SAMPLES_FILE`: ``{"output_type", "filters": {filter:
    [record, ...]}}``, the records (:func:`sample_record`) of each lm-eval filter in doc order
    (``none`` for a task without a filter list; gsm8k has ``strict-match`` and
    ``flexible-extract``)."""
    by_filter: dict[str, list[dict[str, Any]]] = {}
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        by_filter.setdefault(str(s.get("filter", "none")), []).append(sample_record(output_type or "", s))
    return {"output_type": output_type, "filters": by_filter}


def from_samples(entry: dict[str, Any]) -> dict[str, dict[str, tuple[float, list[float] | None]]]:
    """Every registered stored-sample metric that applies to one task's stored entry
    (:func:`stored_samples`): ``{filter: {name: (value, per-item values or None)}}``; a metric
    whose function returns ``None`` (it does not apply to these items) is left out."""
    out: dict[str, dict[str, tuple[float, list[float] | None]]] = {}
    for name, (_, rule) in sample_metrics().items():
        if entry.get("output_type") not in rule.output_types:
            continue
        for filter_, records in (entry.get("filters") or {}).items():
            value = rule.compute(records) if records else None
            if value is None:
                continue
            if rule.per_item:
                values = [round(float(v), 6) for v in value]
                out.setdefault(filter_, {})[name] = (float(sum(float(v) for v in value) / len(values)), values)
            else:
                out.setdefault(filter_, {})[name] = (float(value), None)
    return out


def registered() -> dict[str, Metric]:
    return dict(_registry)
