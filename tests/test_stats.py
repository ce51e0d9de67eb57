"""Known-answer tests of harness.analysis.stats (crossed paired bootstrap, Holm, trends, power)."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm

from harness.analysis.stats import (
    ci_half_width,
    compare_family,
    estimate_components,
    granularity_trend,
    holm,
    paired_bootstrap,
    percentile_ci,
    seeds_needed,
    task_weights,
    verdicts,
)

Z95 = float(norm.ppf(0.975))


def _binary(rng, p, shape):
    return (rng.random(shape) < p).astype(float)


# -- the module stands alone ----------------------------------------------------------------


def test_stats_imports_nothing_from_harness():
    src = Path(__file__).resolve().parents[1] / "harness" / "analysis" / "stats.py"
    tree = ast.parse(src.read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, "no relative imports"
            imported.add(node.module.split(".")[0])
    assert imported <= {"__future__", "math", "collections", "typing", "numpy", "scipy"}


# -- paired_bootstrap: known answers --------------------------------------------------------


def test_identical_conditions_give_zero_and_p_one():
    rng = np.random.default_rng(0)
    a = _binary(rng, 0.6, (4, 200))
    r = paired_bootstrap(a, a.copy(), n_boot=2000, seed=3)
    assert r["diff"] == 0.0
    assert (r["ci_low"], r["ci_high"]) == (0.0, 0.0)
    assert r["p_value"] == 1.0
    assert r["se"] == 0.0
    assert (r["n_seeds"], r["n_items"], r["n_boot"]) == (4, 200, 2000)
    assert r["unit"] == "seeds x test items (crossed, paired)"
    [row] = verdicts([r])
    assert row["verdict"] == "no difference detected"
    fam = compare_family({"same": (a, a)}, n_boot=500)
    assert fam["same"]["verdict"] == "no difference detected"
    assert (fam["same"]["ci_family_low"], fam["same"]["ci_family_high"]) == (0.0, 0.0)


def test_constant_shift_gives_degenerate_ci_and_smallest_p():
    rng = np.random.default_rng(1)
    a = rng.normal(0.5, 0.2, size=(5, 300))
    b = a - 0.1
    n_boot = 10_000
    r = paired_bootstrap(a, b, n_boot=n_boot, seed=0)
    assert r["diff"] == pytest.approx(0.1, abs=1e-12)
    assert r["ci_low"] == pytest.approx(0.1, abs=1e-12)
    assert r["ci_high"] == pytest.approx(0.1, abs=1e-12)
    assert r["se"] < 1e-12
    # perfect separation: k = 0, p = 2 (1 + 0) / (1 + B), never 0
    assert r["p_value"] == pytest.approx(2 / (n_boot + 1), rel=1e-12)
    assert 0 < r["p_value"] < 0.001
    assert verdicts([r])[0]["verdict"] == "better"
    # the same shift the other way round
    r2 = paired_bootstrap(b, a, n_boot=n_boot, seed=0)
    assert r2["diff"] == pytest.approx(-0.1, abs=1e-12)
    assert r2["p_value"] == r["p_value"]
    assert verdicts([r2])[0]["verdict"] == "worse"


def test_zero_variance_trap_of_the_old_t_test():
    """Two seeds with the same suite difference (so the old paired t-test over seeds had zero
    variance and said p = 0), but different per-task/per-item differences."""
    n_tasks, per_task = 6, 50
    groups = np.repeat(np.arange(n_tasks), per_task)
    w = task_weights(groups)
    rng = np.random.default_rng(2)
    b = np.zeros((2, n_tasks * per_task))
    b[:, 1::2] = 1.0  # half the items right in every task, on both seeds
    a = b.copy()
    plus = [[6, 0, 3, 0, 3, 0], [0, 3, 0, 6, 0, 3]]  # items a gets right and b wrong
    minus = [[0, 2, 0, 0, 0, 0], [0, 0, 0, 0, 2, 0]]  # items a gets wrong and b right
    for s in range(2):
        for t in range(n_tasks):
            items = np.arange(t * per_task, (t + 1) * per_task)
            wrong = rng.permutation(items[b[s, items] == 0])
            right = rng.permutation(items[b[s, items] == 1])
            a[s, wrong[: plus[s][t]]] = 1.0
            a[s, right[: minus[s][t]]] = 0.0
    per_seed = (a - b) @ w
    assert per_seed[0] == pytest.approx(per_seed[1], abs=1e-15)  # the trap: zero variance
    assert per_seed[0] == pytest.approx(10 / 300)
    r = paired_bootstrap(a, b, weights=w, groups=groups, n_boot=4000, seed=0)
    assert r["diff"] == pytest.approx(10 / 300, abs=1e-12)
    assert r["ci_low"] < r["diff"] < r["ci_high"]
    assert r["ci_high"] - r["ci_low"] > 0.01
    assert r["se"] > 0.003
    assert r["p_value"] > 0
    assert r["unit"].endswith("stratified by group)")
    assert r["n_groups"] == n_tasks


def test_bootstrap_is_paired_over_seeds():
    rng = np.random.default_rng(3)
    a = _binary(rng, 0.6, (6, 300))
    b = _binary(rng, 0.5, (6, 300))
    base = paired_bootstrap(a, b, n_boot=3000, seed=5)
    offset = np.array([[0.4], [-0.4], [0.3], [-0.3], [0.2], [-0.2]])  # large seed effects
    shared = paired_bootstrap(a + offset, b + offset, n_boot=3000, seed=5)
    assert shared["diff"] == pytest.approx(base["diff"], abs=1e-12)
    assert shared["ci_low"] == pytest.approx(base["ci_low"], abs=1e-9)
    assert shared["ci_high"] == pytest.approx(base["ci_high"], abs=1e-9)
    # the same offset on one side only is real seed noise and must widen the interval
    one_sided = paired_bootstrap(a + offset, b, n_boot=3000, seed=5)
    width = base["ci_high"] - base["ci_low"]
    assert one_sided["ci_high"] - one_sided["ci_low"] > 2 * width


def test_bootstrap_is_paired_over_items():
    """A per-item difficulty shared by a and b cancels; one seed -> only items resampled."""
    rng = np.random.default_rng(4)
    item = rng.normal(0, 1.0, size=(1, 400))
    noise = rng.normal(0, 0.05, size=(2, 1, 400))
    base = paired_bootstrap(noise[0], noise[1], n_boot=2000, seed=1)
    shared = paired_bootstrap(noise[0] + item, noise[1] + item, n_boot=2000, seed=1)
    assert shared["ci_low"] == pytest.approx(base["ci_low"], abs=1e-9)
    assert shared["ci_high"] == pytest.approx(base["ci_high"], abs=1e-9)


def test_reproducible_with_seed():
    rng = np.random.default_rng(5)
    a = _binary(rng, 0.65, (3, 250))
    b = _binary(rng, 0.6, (3, 250))
    r1 = paired_bootstrap(a, b, n_boot=3000, seed=11, return_replicates=True)
    r2 = paired_bootstrap(a, b, n_boot=3000, seed=11, return_replicates=True)
    np.testing.assert_array_equal(r1["replicates"], r2["replicates"])
    assert {k: v for k, v in r1.items() if k != "replicates"} == {
        k: v for k, v in r2.items() if k != "replicates"
    }
    r3 = paired_bootstrap(a, b, n_boot=3000, seed=12)
    assert (r3["ci_low"], r3["ci_high"]) != (r1["ci_low"], r1["ci_high"])
    assert r3["diff"] == r1["diff"]
    w1 = r1["ci_high"] - r1["ci_low"]
    w3 = r3["ci_high"] - r3["ci_low"]
    assert abs(w3 - w1) < 0.15 * w1  # only Monte Carlo noise
    assert r1["ci_low"] == pytest.approx(np.quantile(r1["replicates"], 0.025))


def test_task_weights_give_the_mean_over_tasks_of_task_means():
    sizes = {"first": 10, "colour": 30, "fruit": 60}
    groups = np.concatenate([[t] * n for t, n in sizes.items()])
    w = task_weights(groups)
    assert w.sum() == pytest.approx(1.0)
    assert w[0] == pytest.approx(1 / (3 * 10)) and w[-1] == pytest.approx(1 / (3 * 60))
    rng = np.random.default_rng(6)
    a = _binary(rng, 0.7, (3, 100))
    b = _binary(rng, 0.5, (3, 100))

    def suite(x):  # hand computation: per seed, mean over tasks of per-task accuracy
        return np.mean([np.mean([x[s, groups == t].mean() for t in sizes]) for s in range(3)])

    r = paired_bootstrap(a, b, weights=w, groups=groups, n_boot=500)
    assert r["diff"] == pytest.approx(suite(a) - suite(b), abs=1e-12)
    assert r["mean_a"] == pytest.approx(suite(a), abs=1e-12)
    assert r["mean_b"] == pytest.approx(suite(b), abs=1e-12)
    # the weights are scale-free; unweighted differs here (task sizes differ)
    r100 = paired_bootstrap(a, b, weights=w * 100, groups=groups, n_boot=500)
    assert r100["diff"] == pytest.approx(r["diff"], abs=1e-12)
    assert paired_bootstrap(a, b, n_boot=10)["diff"] == pytest.approx((a - b).mean())


def test_stratified_resampling_keeps_every_task_size():
    """One seed, task 0 always +1, task 1 always 0: within-task resampling cannot change the
    suite difference (degenerate interval); pooled resampling can."""
    groups = np.repeat([0, 1], 50)
    d = np.where(groups == 0, 1.0, 0.0)[None, :]
    zeros = np.zeros_like(d)
    strat = paired_bootstrap(d, zeros, groups=groups, n_boot=2000)
    assert strat["diff"] == pytest.approx(0.5)
    assert strat["ci_low"] == pytest.approx(0.5, abs=1e-12)
    assert strat["ci_high"] == pytest.approx(0.5, abs=1e-12)
    pooled = paired_bootstrap(d, zeros, n_boot=2000)
    assert pooled["ci_high"] - pooled["ci_low"] > 0.1


# -- Holm and verdicts ----------------------------------------------------------------------


def test_holm_hand_example_and_monotone():
    assert holm([0.01, 0.04, 0.03, 0.2]) == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert holm([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    out = holm([0.02, float("nan"), 0.03])  # NaN stays NaN and is not counted in m
    assert math.isnan(out[1]) and out[0] == pytest.approx(0.04) and out[2] == pytest.approx(0.04)
    rng = np.random.default_rng(7)
    p = rng.random(20) ** 3
    adj = np.asarray(holm(p))
    order = np.argsort(p)
    assert np.all(np.diff(adj[order]) >= 0)
    assert np.all(adj >= p) and np.all(adj <= 1)


def test_verdicts_follow_the_adjusted_p():
    rows = [
        {"diff": 1.0, "p_value": 0.01},
        {"diff": -2.0, "p_value": 0.04},
        {"diff": 0.5, "p_value": 0.03},
        {"diff": 3.0, "p_value": 0.2},
    ]
    out = verdicts(rows, alpha=0.05)
    assert [r["p_holm"] for r in out] == pytest.approx([0.04, 0.09, 0.09, 0.2])
    assert [r["verdict"] for r in out] == [
        "better",
        "no difference detected",
        "no difference detected",
        "no difference detected",
    ]
    out10 = verdicts(rows, alpha=0.10)
    assert [r["verdict"] for r in out10] == ["better", "worse", "better", "no difference detected"]
    assert out10[0]["family_size"] == 4 and out10[0]["family_alpha"] == pytest.approx(0.025)
    keyed = verdicts({"x": rows[0], "y": rows[3]})
    assert list(keyed) == ["x", "y"] and keyed["x"]["p_holm"] == pytest.approx(0.02)
    assert "p_holm" not in rows[0]  # inputs are not modified


def test_family_interval_is_bonferroni():
    rng = np.random.default_rng(8)
    base = _binary(rng, 0.55, (4, 300))
    pairs = {
        "big": (_binary(rng, 0.75, (4, 300)), base),
        "small": (_binary(rng, 0.59, (4, 300)), base),
        "none": (_binary(rng, 0.55, (4, 300)), base),
    }
    fam = compare_family(pairs, n_boot=4000, seed=2)
    for name, (a, b) in pairs.items():
        row = fam[name]
        single = paired_bootstrap(a, b, n_boot=4000, seed=2, return_replicates=True)
        assert row["ci_low"] == single["ci_low"] and row["p_value"] == single["p_value"]
        lo, hi = percentile_ci(single["replicates"], 0.05 / 3)
        assert (row["ci_family_low"], row["ci_family_high"]) == (lo, hi)
        assert row["ci_family_low"] <= row["ci_low"] and row["ci_family_high"] >= row["ci_high"]
        assert "replicates" not in row
    assert fam["big"]["verdict"] == "better" and fam["big"]["family_ci_excludes_zero"]
    bonf = compare_family(pairs, n_boot=4000, seed=2, rule="bonferroni")
    for row in bonf.values():
        assert (row["verdict"] != "no difference detected") == row["family_ci_excludes_zero"]
    with pytest.raises(ValueError):
        verdicts([{"diff": 1.0, "p_value": 0.01}], rule="bonferroni")


# -- granularity trend ----------------------------------------------------------------------


def test_trend_exactly_linear_in_log2_g():
    rng = np.random.default_rng(9)
    base = 100 * _binary(rng, 0.5, (3, 200))  # item/seed variation shared by every G
    gs = [1, 2, 4, 8]
    tr = granularity_trend({g: base + 5 * math.log2(g) for g in gs}, n_boot=2000, seed=0)
    assert tr["slope"] == pytest.approx(5.0, abs=1e-9)
    assert tr["slope_ci_low"] == pytest.approx(5.0, abs=1e-9)
    assert tr["slope_ci_high"] == pytest.approx(5.0, abs=1e-9)
    assert tr["bump"] == pytest.approx(0.0, abs=1e-9)
    assert tr["shape"] == "rises"
    assert tr["slope_p"] == pytest.approx(2 / 2001)
    assert tr["bump_p"] == 1.0
    assert tr["granularities"] == gs and tr["log2_g"] == [0.0, 1.0, 2.0, 3.0]
    for g in gs:
        assert tr["means"][g] == pytest.approx(base.mean() + 5 * math.log2(g))
    falls = granularity_trend({g: base - 5 * math.log2(g) for g in gs}, n_boot=500)
    assert falls["slope"] == pytest.approx(-5.0) and falls["shape"] == "falls"
    two = granularity_trend({2: base, 8: base + 4}, n_boot=500)
    assert two["slope"] == pytest.approx(2.0) and two["bump"] is None and two["shape"] == "rises"


def test_trend_bump_hand_values_and_shapes():
    rng = np.random.default_rng(10)
    gs = [1, 2, 4, 8, 16]
    heights = [50.0, 56.0, 60.0, 56.0, 50.0]  # inverted V
    scores = {g: h + rng.normal(0, 10, size=(4, 400)) for g, h in zip(gs, heights)}
    tr = granularity_trend(scores, n_boot=2000, seed=1)
    m = tr["means"]
    assert tr["bump"] == pytest.approx(m[4] - (m[1] + m[16]) / 2, abs=1e-12)
    x = np.log2(gs)
    slope = np.polyfit(x, [m[g] for g in gs], 1)[0]
    assert tr["slope"] == pytest.approx(slope, abs=1e-10)
    assert tr["bump_ci_low"] > 0 and tr["shape"] == "peaks in the middle"
    v = granularity_trend({g: 2 * 55 - s for g, s in scores.items()}, n_boot=2000, seed=1)
    assert v["shape"] == "dips in the middle" and v["bump"] == pytest.approx(-tr["bump"])
    # a rising curve that bends down (50, 75, 83: the middle is above the chord but below the
    # last point) rises, concave: it does not peak; mirrored, it falls, convex
    bend = {g: h + rng.normal(0, 10, size=(4, 400)) for g, h in zip([6, 12, 24], [50.0, 75.0, 83.0])}
    assert granularity_trend(bend, n_boot=2000, seed=1)["shape"] == "rises, concave"
    assert granularity_trend({g: 100 - s for g, s in bend.items()}, n_boot=2000, seed=1)["shape"] == "falls, convex"
    # an even count: the middle score is the mean of the two middle granularities
    even = granularity_trend({g: scores[g] for g in [1, 2, 4, 8]}, n_boot=200)
    me = even["means"]
    assert even["bump"] == pytest.approx((me[2] + me[4]) / 2 - (me[1] + me[8]) / 2)


def test_trend_pure_noise_is_mostly_flat():
    shapes = []
    for data_seed in range(10):
        rng = np.random.default_rng(100 + data_seed)
        scores = {g: _binary(rng, 0.6, (4, 500)) for g in [1, 2, 4, 8]}
        shapes.append(granularity_trend(scores, n_boot=1000, seed=data_seed)["shape"])
    assert shapes.count("flat within noise") >= 8


# -- power ----------------------------------------------------------------------------------


def _simulate(rng, n_seeds, n_items, sd_seed, sd_item, sd_inter, item_effect=None):
    if item_effect is None:
        item_effect = rng.normal(0, sd_item, size=n_items)
    b = rng.normal(0.5, 0.3, size=(n_seeds, n_items))
    d = (
        0.02
        + rng.normal(0, sd_seed, size=(n_seeds, 1))
        + item_effect[None, :]
        + rng.normal(0, sd_inter, size=(n_seeds, n_items))
    )
    return b + d, b


def test_ci_half_width_formula():
    assert ci_half_width(0.01, 0.2, 4, 500) == pytest.approx(Z95 * math.sqrt(0.01 / 4 + 0.2 / 500))
    assert ci_half_width(0.01, 0.0, 1, 1, alpha=0.1) == pytest.approx(float(norm.ppf(0.95)) * 0.1)


@pytest.mark.parametrize("sd_seed", [0.0, 0.03])
def test_ci_half_width_matches_the_bootstrap(sd_seed):
    rng = np.random.default_rng(11)
    a, b = _simulate(rng, 8, 600, sd_seed, 0.3, 0.5)
    var_seed, var_item = estimate_components(a, b)
    r = paired_bootstrap(a, b, n_boot=4000, seed=0)
    empirical = (r["ci_high"] - r["ci_low"]) / 2
    predicted = ci_half_width(var_seed, var_item, 8, 600)
    assert predicted == pytest.approx(empirical, rel=0.15)


def test_ci_half_width_matches_the_bootstrap_binary_with_tasks():
    rng = np.random.default_rng(12)
    groups = np.repeat(np.arange(6), 100)
    w = task_weights(groups)
    difficulty = rng.uniform(0.1, 0.9, size=600)
    gain = rng.normal(0.05, 0.15, size=600)
    b = _binary(rng, difficulty, (8, 600))
    a = _binary(rng, np.clip(difficulty + gain, 0, 1), (8, 600))
    var_seed, var_item = estimate_components(a, b, weights=w, groups=groups)
    r = paired_bootstrap(a, b, weights=w, groups=groups, n_boot=4000, seed=0)
    empirical = (r["ci_high"] - r["ci_low"]) / 2
    assert ci_half_width(var_seed, var_item, 8, 600) == pytest.approx(empirical, rel=0.15)


def test_components_project_to_more_seeds():
    """Pilot with 6 seeds predicts the bootstrap half-width of a 16-seed study on the same
    items, and the 'sampling' target matches the model's true sampling variance."""
    rng = np.random.default_rng(13)
    sd_seed, sd_item, sd_inter, n_items = 0.01, 0.3, 0.6, 500
    item_effect = rng.normal(0, sd_item, size=n_items)
    pilot = _simulate(rng, 6, n_items, sd_seed, sd_item, sd_inter, item_effect)
    study = _simulate(rng, 16, n_items, sd_seed, sd_item, sd_inter, item_effect)
    var_seed, var_item = estimate_components(*pilot)
    r = paired_bootstrap(*study, n_boot=4000, seed=0)
    empirical = (r["ci_high"] - r["ci_low"]) / 2
    assert ci_half_width(var_seed, var_item, 16, n_items) == pytest.approx(empirical, rel=0.15)
    vs, vi = estimate_components(*pilot, target="sampling")
    truth = Z95 * math.sqrt(sd_seed**2 / 16 + sd_item**2 / n_items + sd_inter**2 / (16 * n_items))
    assert ci_half_width(vs, vi, 16, n_items) == pytest.approx(truth, rel=0.15)
    assert vs < var_seed and vi == var_item


def test_seeds_needed_smallest_and_impossible():
    # item term 0: hw(n) = z * 0.1 / sqrt(n) <= 0.05  <=>  n >= (0.1 z / 0.05)^2 = 15.37
    assert seeds_needed(0.05, 0.01, 0.0, 1000) == 16
    assert ci_half_width(0.01, 0.0, 16, 1000) <= 0.05 < ci_half_width(0.01, 0.0, 15, 1000)
    # (0.04 / z)^2 = 4.165e-4; minus the item term 0.2 / 1000 leaves 2.165e-4: n >= 23.1
    n = seeds_needed(0.04, 0.005, 0.2, 1000)
    assert n == 24
    assert ci_half_width(0.005, 0.2, n, 1000) <= 0.04 < ci_half_width(0.005, 0.2, n - 1, 1000)
    # the item term alone already exceeds the target: no number of seeds helps
    assert Z95 * math.sqrt(1.0 / 1000) > 0.05
    assert seeds_needed(0.05, 0.01, 1.0, 1000) is None
    assert seeds_needed(0.05, 0.01, 0.0, 1000, max_seeds=15) is None
    assert seeds_needed(1.0, 0.01, 0.0, 1000) == 2  # min_seeds
    assert seeds_needed(1.0, 0.01, 0.0, 1000, min_seeds=1) == 1


# -- size and inputs ------------------------------------------------------------------------


def test_default_size_runs_vectorised():
    rng = np.random.default_rng(14)
    a = _binary(rng, 0.62, (8, 600))
    b = _binary(rng, 0.58, (8, 600))
    r = paired_bootstrap(a, b, n_boot=10_000, seed=0, return_replicates=True)
    assert r["replicates"].shape == (10_000,)
    assert np.all(np.isfinite(r["replicates"]))
    assert r["ci_low"] < r["diff"] < r["ci_high"]


def test_bad_inputs_are_refused():
    a = np.zeros((2, 5))
    with pytest.raises(ValueError):
        paired_bootstrap(a, np.zeros((3, 5)))
    with pytest.raises(ValueError):
        paired_bootstrap(a, np.full((2, 5), np.nan))
    with pytest.raises(ValueError):
        paired_bootstrap(a, a, weights=np.ones(4))
    with pytest.raises(ValueError):
        paired_bootstrap(a, a, groups=[0, 0, 1])
    with pytest.raises(ValueError):
        paired_bootstrap(a, a, n_boot=0)
    with pytest.raises(ValueError):
        estimate_components(a[:1], a[:1])
    with pytest.raises(ValueError):
        granularity_trend({4: a})
