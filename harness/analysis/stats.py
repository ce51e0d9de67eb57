"""Paired, hierarchical (seeds x test items) bootstrap statistics for comparing methods.

Standalone: imports only numpy, scipy and the standard library (nothing from ``harness``).

Data model
----------
A *condition* (one method at one granularity) is a 2-D array ``scores[seed, item]`` of
per-item scores (0/1 correctness or any float). Every condition of one study is evaluated on
the same ``N`` test items in the same order and trained with the same ``S`` seeds, and seed
``s`` of condition A is paired with seed ``s`` of condition B (same data order and
initialisation seed).

The statistic
-------------
With item weights ``w_i > 0`` normalised to ``sum_i w_i = 1`` (default ``w_i = 1/N``), the
score of a condition is the weighted mean over items of the mean over seeds::

    M(X) = (1/S) sum_s sum_i w_i X[s, i]

With ``w_i = 1 / (n_tasks * n_items_of_task(i))`` (see :func:`task_weights`) this is the
unweighted mean over tasks of the per-task mean accuracy, i.e. the suite score of the tables.
A comparison reports ``diff = M(A) - M(B) = M(A - B)`` in the units of the inputs (pass
fractions and multiply by 100 afterwards, or pass percent).

The resampling: a crossed, paired bootstrap
--------------------------------------------
The unit of resampling is *seeds x test items, crossed*: each bootstrap replicate ``r``
independently draws

* ``S`` seed indices ``s*_1..s*_S`` uniformly with replacement from ``0..S-1``, and
* ``N`` item indices ``i*_1..i*_N`` uniformly with replacement from ``0..N-1``; when item
  groups (tasks) are given, the draw is stratified: ``n_g`` indices with replacement from the
  ``n_g`` items of each group ``g``, so every task keeps its size,

and evaluates the statistic on the sub-array ``X[s*, :][:, i*]`` with the drawn items'
weights (a ratio estimator; with stratified draws and weights constant within a group, as
for :func:`task_weights`, the denominator is exactly 1)::

    T_r(X) = (1/S) sum_k sum_l w_{i*_l} X[s*_k, i*_l] / sum_l w_{i*_l}

*Paired* means that within a replicate the same seed indices and the same item indices are
used for every condition (A and B of a comparison; every granularity of a trend), so
whatever the conditions share (a hard seed, a hard item) cancels in the difference.
Replicates are computed as count matrices, ``T_r = c_r^T X v_r / (S * sum_i v_ri)`` with
``c_r`` the seed draw counts and ``v_ri = w_i * (item draw count)``, vectorised in chunks.

From the ``B = n_boot`` replicates ``t_r = T_r(A) - T_r(B)``:

* ``ci_low, ci_high``: the percentile interval, the ``alpha/2`` and ``1 - alpha/2`` sample
  quantiles of ``t_r`` (numpy's default linear interpolation);
* ``se``: the standard deviation of ``t_r`` (ddof = 1);
* ``p_value``: two-sided bootstrap p-value, never 0::

      p = min(1, 2 * (1 + k) / (1 + B)),   k = #{r : t_r <= 0}  if diff > 0,
                                           k = #{r : t_r >= 0}  if diff < 0,
      p = 1 if diff == 0.

  A perfect separation gives ``p = 2 / (B + 1)``. "0" here means within
  ``zero_tol = 1e-9 * max(1, max |score|)`` of zero, so floating-point round-off of an
  exactly-zero effect is not read as a sign.

What the crossed bootstrap estimates
------------------------------------
Write the paired difference as ``D[s,i] = mu + sigma_s + tau_i + eps_si`` (seed effect,
item effect, seed x item interaction). With equal weights and ``S`` seeds, ``N`` items, the
sampling variance of ``diff`` over new seeds *and* new items is
``var_s/S + var_t/N + var_e/(S N)``. The crossed bootstrap's variance is, exactly for the
observed array (equal weights, no groups), ``A/S + B/N + E/(S N)`` with ``A = mean_s a_s^2``,
``B = mean_i b_i^2``, ``E = mean_si e_si^2`` the plain mean squares (not divided by degrees
of freedom) of the two-way decomposition ``D = m + a_s + b_i + e_si``; in expectation about
``(S-1)/S * var_s/S + var_t/N + 3 var_e/(S N)``: it is conservative in the interaction
(counted three times, as for any "pigeonhole" bootstrap of a crossed design) and, with very
few seeds, slightly optimistic in the seed term (the factor ``(S-1)/S``: 1/2 at 2 seeds).
:func:`estimate_components` can target either quantity.

Families of comparisons
-----------------------
:func:`holm` adjusts p-values (Holm-Bonferroni), :func:`verdicts` turns a family into words
("better" / "worse" / "no difference detected") and adds the Bonferroni family-wise interval
at level ``1 - alpha/m``; :func:`compare_family` does both from score arrays.

Granularity trends and power
----------------------------
:func:`granularity_trend` fits the slope of the score against ``log2 G`` and a middle bump
under the same resampling; :func:`estimate_components`, :func:`ci_half_width` and
:func:`seeds_needed` plan the number of seeds for a target interval half-width.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.stats import norm

UNIT = "seeds x test items (crossed, paired)"
UNIT_STRATIFIED = "seeds x test items (crossed, paired; items stratified by group)"

# one chunk of replicates holds about this many (replicate, item) cells (float64: ~32 MB)
_CELLS_PER_CHUNK = 4_000_000

__all__ = [
    "UNIT",
    "UNIT_STRATIFIED",
    "ci_half_width",
    "compare_family",
    "estimate_components",
    "granularity_trend",
    "holm",
    "paired_bootstrap",
    "paired_bootstraps",
    "percentile_ci",
    "seeds_needed",
    "task_weights",
    "verdicts",
]


# -- inputs ----------------------------------------------------------------------------------


def _as_scores(x: Any, name: str) -> np.ndarray:
    """A ``[seed, item]`` float array; a 1-D array is one seed."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D array scores[seed, item], got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name}: needs at least one seed and one item, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name}: scores must be finite (no NaN / inf)")
    return arr


def _normalised_weights(weights: Any, n_items: int) -> np.ndarray:
    """Item weights normalised to sum 1 (equal weights when ``None``)."""
    if weights is None:
        return np.full(n_items, 1.0 / n_items)
    w = np.asarray(weights, dtype=float)
    if w.shape != (n_items,):
        raise ValueError(f"weights: expected shape ({n_items},), got {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError("weights: must be finite and > 0 (drop an item rather than weight it 0)")
    return w / w.sum()


def _strata(groups: Any, n_items: int) -> list[np.ndarray] | None:
    """Index arrays of the items of each group, in order of first appearance (None: no groups)."""
    if groups is None:
        return None
    labels = list(groups)
    if len(labels) != n_items:
        raise ValueError(f"groups: expected {n_items} labels, got {len(labels)}")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(labels):
        members.setdefault(g, []).append(i)
    return [np.asarray(idx, dtype=np.int64) for idx in members.values()]


def _check_common(n_boot: int, alpha: float) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def _zero_tol(*arrays: np.ndarray) -> float:
    scale = max([1.0] + [float(np.max(np.abs(a))) for a in arrays])
    return 1e-9 * scale


def task_weights(groups: Sequence[Hashable]) -> np.ndarray:
    """Item weights ``w_i = 1 / (n_tasks * n_items_of_task(i))`` (they sum to 1), so the
    weighted item mean equals the unweighted mean over tasks of the per-task mean score."""
    labels = list(groups)
    if not labels:
        raise ValueError("groups: empty")
    counts: dict[Hashable, int] = {}
    for g in labels:
        counts[g] = counts.get(g, 0) + 1
    n_tasks = len(counts)
    return np.asarray([1.0 / (n_tasks * counts[g]) for g in labels], dtype=float)


# -- the crossed resampler -------------------------------------------------------------------


def _replicate_chunks(
    n_seeds: int,
    n_items: int,
    strata: list[np.ndarray] | None,
    n_boot: int,
    seed: int,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(seed_counts[c, S], item_counts[c, N])`` for successive chunks of replicates.

    Replicate ``r``: ``S`` seed indices uniform with replacement, and independently ``N`` item
    indices uniform with replacement (within each stratum when strata are given), turned into
    draw counts with ``bincount``. The chunk size depends only on ``(S, N)``, so the draws are
    a deterministic function of ``(seed, S, N, strata, n_boot)``: two calls with equal shapes
    and seed use identical replicates (common random numbers across comparisons)."""
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _CELLS_PER_CHUNK // max(n_items, n_seeds)))
    done = 0
    while done < n_boot:
        c = min(chunk, n_boot - done)
        rows = np.arange(c, dtype=np.int64)[:, None]
        s_idx = rng.integers(0, n_seeds, size=(c, n_seeds))
        seed_counts = np.bincount((s_idx + rows * n_seeds).ravel(), minlength=c * n_seeds).reshape(
            c, n_seeds
        )
        if strata is None:
            i_idx = rng.integers(0, n_items, size=(c, n_items))
        else:
            i_idx = np.concatenate(
                [idx[rng.integers(0, len(idx), size=(c, len(idx)))] for idx in strata], axis=1
            )
        item_counts = np.bincount((i_idx + rows * n_items).ravel(), minlength=c * n_items).reshape(
            c, n_items
        )
        yield seed_counts.astype(float), item_counts.astype(float)
        done += c


def _replicates(
    arrays: Sequence[np.ndarray],
    w: np.ndarray,
    strata: list[np.ndarray] | None,
    n_boot: int,
    seed: int,
) -> np.ndarray:
    """``out[j, r] = T_r(arrays[j])``: the statistic of every array under the same replicates."""
    n_seeds, n_items = arrays[0].shape
    out = np.empty((len(arrays), n_boot))
    pos = 0
    for seed_counts, item_counts in _replicate_chunks(n_seeds, n_items, strata, n_boot, seed):
        c = seed_counts.shape[0]
        v = item_counts * w  # (c, N): drawn weight of each item
        denom = n_seeds * v.sum(axis=1)  # (c,)
        for j, x in enumerate(arrays):
            per_seed = x @ v.T  # (S, c): sum_i v_ri X[s, i]
            out[j, pos : pos + c] = np.einsum("cs,sc->c", seed_counts, per_seed) / denom
        pos += c
    return out


def _point(x: np.ndarray, w: np.ndarray) -> float:
    """``M(X) = (1/S) sum_s sum_i w_i X[s, i]`` (w normalised)."""
    return float(x.mean(axis=0) @ w)


def percentile_ci(replicates: Any, alpha: float = 0.05) -> tuple[float, float]:
    """The percentile interval at level ``1 - alpha``: the ``alpha/2`` and ``1 - alpha/2``
    sample quantiles of the bootstrap replicates (numpy's linear interpolation)."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    lo, hi = np.quantile(np.asarray(replicates, dtype=float), [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def _two_sided_p(estimate: float, replicates: np.ndarray, tol: float) -> float:
    """``min(1, 2 (1 + k) / (1 + B))``, ``k`` = replicates on the other side of 0 or at 0
    (within ``tol``); 1 when the estimate itself is 0 (within ``tol``)."""
    if abs(estimate) <= tol:
        return 1.0
    if estimate > 0:
        k = int(np.count_nonzero(replicates <= tol))
    else:
        k = int(np.count_nonzero(replicates >= -tol))
    return min(1.0, 2.0 * (1 + k) / (1 + replicates.size))


def _summary(estimate: float, reps: np.ndarray, alpha: float, tol: float) -> dict[str, float]:
    lo, hi = percentile_ci(reps, alpha)
    return {
        "ci_low": lo,
        "ci_high": hi,
        "p_value": _two_sided_p(estimate, reps, tol),
        "se": float(reps.std(ddof=1)) if reps.size > 1 else math.nan,
    }


# -- one comparison --------------------------------------------------------------------------


def paired_bootstrap(
    a: Any,
    b: Any,
    *,
    weights: Any = None,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    return_replicates: bool = False,
) -> dict[str, Any]:
    """Paired crossed bootstrap of ``diff = M(a) - M(b)`` (module docstring: formulas).

    ``a``, ``b``: ``scores[seed, item]`` of the same shape (row ``s`` of ``a`` paired with
    row ``s`` of ``b``, column ``i`` the same test item); any float per-item values (0/1
    correctness, a Brier score, a loss). ``weights``: per-item weights (any
    positive scale; normalised to sum 1; default equal; :func:`task_weights` gives the suite
    score). ``groups``: per-item group labels (tasks); when given, items are resampled within
    their group. Unit of resampling: seeds and items, crossed; both paired between a and b.

    Returns a dict: ``diff, mean_a, mean_b`` (input units), ``ci_low, ci_high`` (percentile
    interval at ``ci_level = 1 - alpha``), ``p_value`` (two-sided, ``>= 2/(n_boot+1)``),
    ``se`` (std of replicates), ``alpha, ci_level, n_seeds, n_items, n_groups, n_boot, seed,
    unit, zero_tol``; with ``return_replicates`` also ``replicates`` (``ndarray[n_boot]`` of
    ``t_r``; :func:`percentile_ci` gives other levels, :func:`verdicts` the family-wise one).
    """
    return paired_bootstraps([(a, b)], weights=weights, groups=groups, n_boot=n_boot, seed=seed,
                             alpha=alpha, return_replicates=return_replicates)[0]


def paired_bootstraps(
    pairs: Sequence[tuple[Any, Any]],
    *,
    weights: Any = None,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    return_replicates: bool = False,
) -> list[dict[str, Any]]:
    """:func:`paired_bootstrap` of every ``(a, b)`` of ``pairs``, all of one ``[seed, item]``
    shape on the same items (``weights`` and ``groups`` shared), under one set of draws: each
    result equals its own :func:`paired_bootstrap` call exactly (the draws depend only on
    ``seed``, the shape, the groups and ``n_boot``), at about the cost of one call."""
    _check_common(n_boot, alpha)
    arrays = []
    for a, b in pairs:
        a, b = _as_scores(a, "a"), _as_scores(b, "b")
        if a.shape != b.shape:
            raise ValueError(f"a and b must have the same [seed, item] shape: {a.shape} != {b.shape}")
        if arrays and a.shape != arrays[0][0].shape:
            raise ValueError(f"every pair must have one [seed, item] shape: {a.shape} != {arrays[0][0].shape}")
        arrays.append((a, b))
    if not arrays:
        return []
    n_seeds, n_items = arrays[0][0].shape
    w = _normalised_weights(weights, n_items)
    strata = _strata(groups, n_items)
    diffs = [a - b for a, b in arrays]
    replicates = _replicates(diffs, w, strata, int(n_boot), seed)
    results = []
    for (a, b), d, reps in zip(arrays, diffs, replicates):
        diff = _point(d, w)
        tol = _zero_tol(a, b)
        out: dict[str, Any] = {
            "diff": diff,
            "mean_a": _point(a, w),
            "mean_b": _point(b, w),
            **_summary(diff, reps, alpha, tol),
            "alpha": alpha,
            "ci_level": 1 - alpha,
            "n_seeds": n_seeds,
            "n_items": n_items,
            "n_groups": len(strata) if strata is not None else None,
            "n_boot": int(n_boot),
            "seed": seed,
            "unit": UNIT if strata is None else UNIT_STRATIFIED,
            "zero_tol": tol,
        }
        if return_replicates:
            out["replicates"] = reps
        results.append(out)
    return results


# -- families of comparisons -----------------------------------------------------------------


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order.

    With the ``m`` finite p-values sorted ascending, ``p_(1) <= ... <= p_(m)``::

        p_adj_(j) = min(1, max_{k <= j} (m - k + 1) p_(k))

    (monotone in ``p``, capped at 1). A NaN p-value stays NaN and does not count in ``m``.
    Example: ``[0.01, 0.04, 0.03, 0.2] -> [0.04, 0.09, 0.09, 0.2]``."""
    p = np.asarray(list(p_values), dtype=float)
    out = np.full(p.shape, math.nan)
    finite = np.flatnonzero(~np.isnan(p))
    m = finite.size
    if m == 0:
        return out.tolist()
    order = finite[np.argsort(p[finite], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out.tolist()


def verdicts(
    results: Sequence[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    alpha: float = 0.05,
    *,
    rule: str = "holm",
) -> list[dict[str, Any]] | dict[str, dict[str, Any]]:
    """Words for a family of ``m`` comparisons (each a :func:`paired_bootstrap` result, or any
    mapping with ``diff`` and ``p_value``), returned in the same container (list or dict) as
    copies with these keys added (``replicates`` is dropped):

    * ``p_holm``: Holm-adjusted p-values over the family (:func:`holm`);
    * ``family_size`` = m, ``family_alpha = alpha / m``;
    * ``ci_family_low, ci_family_high``: the Bonferroni family-wise percentile interval at
      level ``1 - alpha/m`` (quantiles ``alpha/(2m)`` and ``1 - alpha/(2m)`` of the
      replicates), and ``family_ci_excludes_zero``; present only when the result carries
      ``replicates`` (``paired_bootstrap(..., return_replicates=True)``);
    * ``verdict``: with ``rule="holm"`` (default) "better" / "worse" (the sign of ``diff``)
      where ``p_holm < alpha``, else "no difference detected". Holm rejects at least what
      Bonferroni rejects, so a "better" may have a family interval that touches 0. With
      ``rule="bonferroni"`` the verdict is "better" / "worse" exactly where the family
      interval excludes zero (needs replicates), so the sentence "better only where the
      interval corrected for the number of comparisons excludes zero" holds literally.
    """
    if rule not in ("holm", "bonferroni"):
        raise ValueError(f"rule must be 'holm' or 'bonferroni', got {rule!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    keyed = isinstance(results, Mapping)
    names = list(results.keys()) if keyed else list(range(len(results)))
    rows = [dict(results[k]) for k in names]  # type: ignore[index]
    m = len(rows)
    adjusted = holm([float(r["p_value"]) for r in rows])
    for row, p_adj in zip(rows, adjusted):
        reps = row.pop("replicates", None)
        diff = float(row["diff"])
        row["p_holm"] = p_adj
        row["family_size"] = m
        row["family_alpha"] = alpha / m
        tol = float(row.get("zero_tol", 0.0))
        excludes = None
        if reps is not None:
            lo, hi = percentile_ci(reps, alpha / m)
            excludes = lo > tol or hi < -tol
            row["ci_family_low"], row["ci_family_high"] = lo, hi
            row["family_ci_excludes_zero"] = excludes
        if rule == "holm":
            significant = not math.isnan(p_adj) and p_adj < alpha and abs(diff) > tol
        else:
            if excludes is None:
                raise ValueError("rule='bonferroni' needs results with 'replicates'")
            significant = excludes
        row["verdict"] = (
            ("better" if diff > 0 else "worse") if significant else "no difference detected"
        )
    return dict(zip(names, rows)) if keyed else rows


def compare_family(
    pairs: Mapping[str, tuple[Any, Any]],
    *,
    weights: Any = None,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    rule: str = "holm",
) -> dict[str, dict[str, Any]]:
    """:func:`paired_bootstrap` for every ``name -> (a, b)`` (all with the same ``seed``, so
    equal-shaped comparisons share their replicates) followed by :func:`verdicts` over the
    family: each row has ``diff, ci_low, ci_high, p_value, p_holm, ci_family_low,
    ci_family_high, family_ci_excludes_zero, verdict, ...``."""
    results = {
        name: paired_bootstrap(
            a,
            b,
            weights=weights,
            groups=groups,
            n_boot=n_boot,
            seed=seed,
            alpha=alpha,
            return_replicates=True,
        )
        for name, (a, b) in pairs.items()
    }
    return verdicts(results, alpha, rule=rule)  # type: ignore[return-value]


# -- granularity trend -----------------------------------------------------------------------


SHAPE_RULE = (
    "peaks in the middle: CI of (middle - higher end) > 0; dips in the middle: CI of "
    "(lower end - middle) > 0; otherwise rises: slope CI > 0; falls: slope CI < 0; otherwise "
    "flat within noise; a rise or fall is 'concave' (gains shrink with G) when the bump CI > 0 "
    "and 'convex' when it is < 0 (two-sided 1-alpha percentile CIs; bump, peak and dip only "
    "with >= 3 granularities)"
)


def granularity_trend(
    scores_by_g: Mapping[int, Any],
    *,
    weights: Any = None,
    groups: Sequence[Hashable] | None = None,
    n_boot: int = 10_000,
    seed: int = 0,
    alpha: float = 0.05,
    return_replicates: bool = False,
) -> dict[str, Any]:
    """Trend of one method's score over its granularities ``G`` (``scores_by_g[G]`` is that
    condition's ``scores[seed, item]``; all the same shape and pairing).

    With ``m_G = M(scores_by_g[G])`` and ``x_G = log2 G``, ``xc_G = x_G - mean(x)``:

    * ``slope = sum_G xc_G m_G / sum_G xc_G^2``: the least-squares slope of the score against
      ``log2 G``, in input units per doubling of G (needs >= 2 granularities);
    * ``bump = m_mid - (m_smallest + m_largest) / 2`` with ``m_mid`` the score at the middle
      granularity (for an even count, the mean of the two middle ones); only with >= 3
      granularities (else ``None``).

    CIs, p-values and ``se`` come from the crossed bootstrap of the module docstring, paired
    across granularities: in one replicate every ``G`` uses the same seed and item indices.
    ``shape`` (rule also in ``SHAPE_RULE``), from the (1 - alpha) percentile intervals:
    "peaks in the middle" if ``m_mid - max(m_smallest, m_largest)`` is above 0 (the middle
    beats both ends), "dips in the middle" if ``min(m_smallest, m_largest) - m_mid`` is above
    0; otherwise "rises" if the slope interval is above 0, "falls" if below 0, with ", concave"
    when the bump interval is above 0 (the curve bends down: each doubling of G adds less)
    and ", convex" when below 0; otherwise "flat within noise". A rising curve with a positive
    bump is *not* a peak: 50, 75, 83 rises, concave. (The intervals are not corrected for
    being several.)

    Returns ``granularities, log2_g, means {G: m_G}, mean_ci {G: (lo, hi)}, slope,
    slope_ci_low, slope_ci_high, slope_p, slope_se, bump, bump_ci_low, bump_ci_high, bump_p,
    bump_se, shape, shape_rule, alpha, n_seeds, n_items, n_boot, seed, unit``.
    """
    _check_common(n_boot, alpha)
    gs = sorted(scores_by_g)
    if len(gs) < 2:
        raise ValueError("granularity_trend needs at least 2 granularities")
    if any(g <= 0 for g in gs):
        raise ValueError(f"granularities must be positive, got {gs}")
    arrays = [_as_scores(scores_by_g[g], f"scores_by_g[{g}]") for g in gs]
    shape = arrays[0].shape
    for g, arr in zip(gs, arrays):
        if arr.shape != shape:
            raise ValueError(f"scores_by_g[{g}] has shape {arr.shape}, expected {shape}")
    n_seeds, n_items = shape
    w = _normalised_weights(weights, n_items)
    strata = _strata(groups, n_items)
    x = np.log2(np.asarray(gs, dtype=float))
    xc = x - x.mean()
    beta = xc / float(xc @ xc)  # slope = beta @ means
    k = len(gs)
    if k >= 3:
        gamma = np.zeros(k)
        if k % 2:
            gamma[k // 2] = 1.0
        else:
            gamma[k // 2 - 1] = gamma[k // 2] = 0.5
        gamma[0] -= 0.5
        gamma[-1] -= 0.5
    else:
        gamma = None
    means = np.asarray([_point(arr, w) for arr in arrays])
    reps = _replicates(arrays, w, strata, int(n_boot), seed)  # (k, B)
    tol = _zero_tol(*arrays)
    slope = float(beta @ means)
    s_slope = _summary(slope, beta @ reps, alpha, tol)
    out: dict[str, Any] = {
        "granularities": gs,
        "log2_g": x.tolist(),
        "means": {g: float(mv) for g, mv in zip(gs, means)},
        "mean_ci": {g: percentile_ci(reps[j], alpha) for j, g in enumerate(gs)},
        "slope": slope,
        "slope_ci_low": s_slope["ci_low"],
        "slope_ci_high": s_slope["ci_high"],
        "slope_p": s_slope["p_value"],
        "slope_se": s_slope["se"],
    }
    peak = dip = None
    if gamma is not None:
        bump = float(gamma @ means)
        s_bump = _summary(bump, gamma @ reps, alpha, tol)
        mid = reps[k // 2] if k % 2 else (reps[k // 2 - 1] + reps[k // 2]) / 2
        m_mid = float(gamma @ means + (means[0] + means[-1]) / 2)
        peak = _summary(m_mid - max(means[0], means[-1]), mid - np.maximum(reps[0], reps[-1]), alpha, tol)
        dip = _summary(min(means[0], means[-1]) - m_mid, np.minimum(reps[0], reps[-1]) - mid, alpha, tol)
        out.update(
            {
                "bump": bump,
                "bump_ci_low": s_bump["ci_low"],
                "bump_ci_high": s_bump["ci_high"],
                "bump_p": s_bump["p_value"],
                "bump_se": s_bump["se"],
            }
        )
    else:
        out.update(
            {
                "bump": None,
                "bump_ci_low": None,
                "bump_ci_high": None,
                "bump_p": None,
                "bump_se": None,
            }
        )
    if peak is not None and peak["ci_low"] > tol:
        word = "peaks in the middle"
    elif dip is not None and dip["ci_low"] > tol:
        word = "dips in the middle"
    elif out["slope_ci_low"] > tol or out["slope_ci_high"] < -tol:
        word = "rises" if out["slope_ci_low"] > tol else "falls"
        if gamma is not None and out["bump_ci_low"] > tol:
            word += ", concave"
        elif gamma is not None and out["bump_ci_high"] < -tol:
            word += ", convex"
    else:
        word = "flat within noise"
    out.update(
        {
            "shape": word,
            "shape_rule": SHAPE_RULE,
            "alpha": alpha,
            "n_seeds": n_seeds,
            "n_items": n_items,
            "n_boot": int(n_boot),
            "seed": seed,
            "unit": UNIT if strata is None else UNIT_STRATIFIED,
        }
    )
    if return_replicates:
        out["replicates"] = {g: reps[j] for j, g in enumerate(gs)}
    return out


# -- power -----------------------------------------------------------------------------------


def estimate_components(
    a: Any,
    b: Any,
    weights: Any = None,
    groups: Sequence[Hashable] | None = None,
    *,
    target: str = "bootstrap",
) -> tuple[float, float]:
    """``(var_seed, var_item)`` of the paired difference ``D = a - b`` from pilot data (at
    least 2 seeds), for :func:`ci_half_width` ``= z sqrt(var_seed/n_seeds + var_item/n_items)``.

    With ``w`` normalised, ``d_s = sum_i w_i D[s,i]`` (per-seed weighted mean difference),
    ``Dbar_i = mean_s D[s,i]`` (per-item difference averaged over seeds), ``m = mean_s d_s``:

    * between-seed variance ``V_s = sum_s (d_s - m)^2 / (S - 1)``;
    * interaction: residuals ``e_si = D[s,i] - Dbar_i - (d_s - m)``, per-item interaction
      variance ``v_i = sum_s e_si^2 / ((S - 1)(1 - 2 w_i + sum_k w_k^2))`` (unbiased under
      homoscedastic noise), and ``c_e = sum_i w_i^2 v_i`` (its variance in one seed's mean);
    * item-resampling variance of the weighted mean,
      ``V_I = sum_g n_g/(n_g - 1) sum_{i in g} (u_i - mean_g u)^2`` with
      ``u_i = w_i (Dbar_i - m)`` (one group of all items when ``groups`` is None);
      the usual correction removes the seed noise carried by the seed-averaged ``Dbar_i``:
      ``V_t = max(0, V_I - sum_{i in groups of >= 2} w_i^2 v_i / S)``.

    Returned: ``var_item = N * V_t`` (per-item units) and ``var_seed = max(V_s, c_e) + k c_e``
    (``V_s`` estimates ``var_seed_effect + c_e``, so it is truncated at ``c_e``, as a negative
    ANOVA variance component is truncated at 0; with few pilot seeds ``V_s`` has only
    ``S - 1`` degrees of freedom, so treat the projection as rough), with
    ``k = 2`` for ``target="bootstrap"`` (what the crossed bootstrap's interval will show:
    it counts the interaction three times, see the module docstring) or ``k = 0`` for
    ``target="sampling"`` (the sampling variance over new seeds and items). The
    interaction is folded into the seed term, so projections are for the same test set
    (``n_items = N``) and any number of seeds."""
    if target not in ("bootstrap", "sampling"):
        raise ValueError(f"target must be 'bootstrap' or 'sampling', got {target!r}")
    a = _as_scores(a, "a")
    b = _as_scores(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same [seed, item] shape: {a.shape} != {b.shape}")
    n_seeds, n_items = a.shape
    if n_seeds < 2:
        raise ValueError("estimate_components needs at least 2 seeds")
    w = _normalised_weights(weights, n_items)
    strata = _strata(groups, n_items) or [np.arange(n_items)]
    d_mat = a - b
    d = d_mat @ w
    m = float(d.mean())
    var_s = float(d.var(ddof=1))
    dbar = d_mat.mean(axis=0)
    e = d_mat - dbar[None, :] - (d - m)[:, None]
    q = 1.0 - 2.0 * w + float(w @ w)
    v = (e**2).sum(axis=0) / ((n_seeds - 1) * q)
    c_e = float((w**2) @ v)
    var_i = 0.0
    noise = 0.0
    for idx in strata:
        n_g = len(idx)
        if n_g < 2:
            continue
        u = w[idx] * (dbar[idx] - m)
        var_i += n_g / (n_g - 1) * float(((u - u.mean()) ** 2).sum())
        noise += float((w[idx] ** 2) @ v[idx]) / n_seeds
    var_item = n_items * max(0.0, var_i - noise)
    # E[V_s] = sigma_seed^2 + c_e >= c_e: a smaller V_s is sampling noise (few seeds)
    var_seed = max(var_s, c_e) + (2.0 * c_e if target == "bootstrap" else 0.0)
    return var_seed, var_item


def ci_half_width(
    var_seed: float, var_item: float, n_seeds: int, n_items: int, alpha: float = 0.05
) -> float:
    """Expected half-width of the ``1 - alpha`` interval of a paired difference in the crossed
    design: ``z_{1-alpha/2} * sqrt(var_seed / n_seeds + var_item / n_items)`` (normal
    approximation; components from :func:`estimate_components`)."""
    if n_seeds < 1 or n_items < 1:
        raise ValueError("n_seeds and n_items must be >= 1")
    if var_seed < 0 or var_item < 0:
        raise ValueError("variances must be >= 0")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    z = float(norm.ppf(1 - alpha / 2))
    return z * math.sqrt(var_seed / n_seeds + var_item / n_items)


def seeds_needed(
    target_half_width: float,
    var_seed: float,
    var_item: float,
    n_items: int,
    alpha: float = 0.05,
    max_seeds: int = 64,
    *,
    min_seeds: int = 2,
) -> int | None:
    """The smallest ``n`` in ``min_seeds..max_seeds`` with
    ``ci_half_width(var_seed, var_item, n, n_items, alpha) <= target_half_width``, or None
    when no such ``n`` exists (in particular when the item term alone,
    ``z sqrt(var_item / n_items)``, already reaches the target: more seeds cannot help;
    more test items would). ``min_seeds = 2`` because one seed gives no seed-level noise
    estimate."""
    if target_half_width <= 0:
        raise ValueError("target_half_width must be > 0")
    if min_seeds < 1 or max_seeds < min_seeds:
        raise ValueError("need 1 <= min_seeds <= max_seeds")
    for n in range(min_seeds, max_seeds + 1):
        if ci_half_width(var_seed, var_item, n, n_items, alpha) <= target_half_width:
            return n
    return None
