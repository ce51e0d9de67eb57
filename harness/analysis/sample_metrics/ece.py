"""Expected calibration error of a multiple-choice task, from the stored choice
log-likelihoods (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural
Networks").

Each item's choice distribution is the softmax of its choices' log-likelihoods (as lm-eval's
Brier score takes it); its confidence is the largest probability and it is right when that
choice is the gold one (lm-eval's ``acc``: the first of tied maxima). With the items split
into :data:`BINS` equal-width confidence bins ``(k/B, (k+1)/B]`` (the first also holds 0)::

    ECE = sum_b (n_b / N) * | accuracy(b) - mean confidence(b) |

0 for a perfectly calibrated model; lower is better. It is a property of all items together,
not a mean of per-item values, so it has no per-item values and no bootstrap interval.
"""

from __future__ import annotations

import math
from typing import Any

from harness.adapters.metrics import Metric
from harness.common.metrics import register_metric

BINS = 10


def confidence_and_correct(item: dict[str, Any]) -> tuple[float, bool] | None:
    """``(largest choice probability, whether that choice is the gold one)`` of one stored
    multiple-choice item; ``None`` without a gold index or log-likelihoods."""
    lls, gold = item.get("loglikelihoods") or [], item.get("gold")
    if not lls or gold is None:
        return None
    top = max(lls)
    weights = [math.exp(ll - top) for ll in lls]
    best = lls.index(top)
    return weights[best] / sum(weights), best == int(gold)


@register_metric(Metric("ece", "expected calibration error", unit="score", higher_is_better=False,
                        decimals=3, main_table=True))
def ece(items: list[dict[str, Any]]) -> float | None:
    """The expected calibration error of one task's stored items (``None``: no item has a gold
    index and log-likelihoods)."""
    scored = [c for c in map(confidence_and_correct, items) if c is not None]
    if not scored:
        return None
    count, conf, right = [0] * BINS, [0.0] * BINS, [0] * BINS
    for p, correct in scored:
        b = min(BINS - 1, max(0, math.ceil(p * BINS) - 1))
        count[b] += 1
        conf[b] += p
        right[b] += int(correct)
    return sum(abs(right[b] - conf[b]) for b in range(BINS) if count[b]) / len(scored)
