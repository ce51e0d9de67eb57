"""Intervals for every per-item metric: the paired bootstrap resamples float per-item values
(a Brier score, not only 0/1 bits), the other metrics get their own Holm-corrected
comparisons (table ``significance_metrics``) in the direction the registry declares, and the
metrics of extra registry tasks (per lm-eval filter) and those computed from stored samples
(ECE) reach the summary, the main table and that table. A fixture study written by hand
(tests/test_tables_and_figures.py's), no model."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest

from harness.analysis.stats import paired_bootstrap, paired_bootstraps, verdicts
from tests.test_tables_and_figures import ACC, ITEMS, TASKS, fixture_config, item_bits, write_run

#: per-item Brier score of a solved and of a missed item (so a better run has a lower mean)
BRIER = {"1": 0.1, "0": 0.9}
#: runs whose folders get stored samples (the others were "evaluated before samples were kept")
WITH_SAMPLES = {"base", "lora", "sira"}


def extra_bits(key: str, seed: int) -> tuple[str, str]:
    """gsm8k-like exact match of a run, two filters: strict solves the first k of 20 items,
    flexible 3 more."""
    k = round(sum(ACC[(key, seed)]) / 2 * 20)
    strict = "1" * k + "0" * (20 - k)
    flexible = "1" * min(20, k + 3) + "0" * (20 - min(20, k + 3))
    return strict, flexible


def mc_records(bits: str) -> list[dict]:
    """Stored multiple-choice items: gold 0; a solved item puts 0.8 on it, a missed one 0.3."""
    out = []
    for i, b in enumerate(bits):
        p = 0.8 if b == "1" else 0.3
        out.append({"doc_id": i, "gold": 0, "loglikelihoods": [math.log(p), math.log(1 - p)],
                    "is_greedy": [False, False]})
    return out


def enrich(plan, run) -> None:
    """Add what today's evaluation stores to a fixture run: Brier per item, an extra registry
    task with two filters, and (some runs) samples.json recorded in the run's manifest."""
    from harness.common.manifest import record_files

    run_dir = plan.run_dir(run)
    path = run_dir / "metrics.json"
    metrics = json.loads(path.read_text())
    key = f"{run.method}-{run.tag}"
    for task in TASKS:
        values = [BRIER[b] for b in metrics["items"][task]["acc"]]
        metrics["items"][task]["brier_score"] = values
        metrics["tasks"][task]["brier_score"] = sum(values) / len(values)
    strict, flexible = extra_bits(key, run.seed)
    metrics["extra_tasks"] = {"gsm8k": {
        "sample_len": 20,
        "exact_match,strict-match": strict.count("1") / 20, "exact_match_stderr,strict-match": 0.1,
        "exact_match,flexible-extract": flexible.count("1") / 20, "exact_match_stderr,flexible-extract": 0.1,
    }}
    metrics["extra_items"] = {"gsm8k": {"exact_match,strict-match": strict, "exact_match,flexible-extract": flexible}}
    metrics["extra_higher_is_better"] = {"gsm8k": {"exact_match": True}}
    path.write_text(json.dumps(metrics))
    if run.method in WITH_SAMPLES:
        samples = {"format": 1, "run_id": run.run_id,
                   "tasks": {t: {"output_type": "multiple_choice",
                                 "filters": {"none": mc_records(metrics["items"][t]["acc"])}} for t in TASKS},
                   "extra_tasks": {}}
        (run_dir / "samples.json").write_text(json.dumps(samples))
        record_files(run_dir, ["samples.json"])


@pytest.fixture
def plan(tmp_path):
    from harness.adapters import TargetShape
    from harness.plan.config import validate_config
    from harness.plan.study import plan_study

    shapes = [TargetShape("model.layers.1.self_attn.q_proj", 32, 32),
              TargetShape("model.layers.1.self_attn.v_proj", 32, 16)]
    plan = plan_study(validate_config(fixture_config(tmp_path / "results"), source="fixture"), shapes=shapes)
    for run in plan.runs:
        write_run(plan, run)
        enrich(plan, run)
    return plan


def test_batched_bootstraps_equal_one_call_per_pair_exactly():
    rng = np.random.default_rng(3)
    groups = ["a"] * 30 + ["b"] * 20
    w = np.r_[np.full(30, 1 / 60), np.full(20, 1 / 40)]
    pairs = [(rng.random((3, 50)), rng.random((3, 50))) for _ in range(4)]
    pairs.append((rng.integers(0, 2, (3, 50)) * 100.0, rng.integers(0, 2, (3, 50)) * 100.0))  # bits in pp
    batched = paired_bootstraps(pairs, weights=w, groups=groups, n_boot=2000, seed=7, return_replicates=True)
    for (a, b), got in zip(pairs, batched):
        one = paired_bootstrap(a, b, weights=w, groups=groups, n_boot=2000, seed=7, return_replicates=True)
        assert np.array_equal(one.pop("replicates"), got["replicates"])
        assert one == {k: v for k, v in got.items() if k != "replicates"}
    with pytest.raises(ValueError, match="one \\[seed, item\\] shape"):
        paired_bootstraps([(np.zeros((2, 5)), np.zeros((2, 5))), (np.zeros((3, 5)), np.zeros((3, 5)))])


def test_float_per_item_values_get_intervals_and_directed_verdicts():
    # a Brier score per item: A is lower (better) by 0.1 on average, plus item noise
    rng = np.random.default_rng(0)
    b = rng.uniform(0.2, 1.2, size=(3, 400))
    a = b - 0.1 + rng.normal(0, 0.05, size=(3, 400))
    res = paired_bootstrap(a, b, n_boot=4000, seed=0, return_replicates=True)
    assert res["diff"] == pytest.approx(float((a - b).mean()), rel=1e-12)
    assert res["ci_low"] <= res["diff"] <= res["ci_high"] < 0
    (decided,) = verdicts([res])
    assert decided["verdict"] == "worse"  # the sign of the difference ...
    from harness.analysis.comparisons import _DIRECTED

    assert _DIRECTED[False][decided["verdict"]] == "better"  # ... read in the Brier score's direction


def _key_of(label: str) -> str:
    return {"LoRA r=4 (rank R)": "lora-r4", "LoRA r=2 (rank K)": "lora-r2", "SiRA G=2": "sira-G2",
            "SiRA G=4": "sira-G4", "SMoRA G=2": "smora-G2", "SMoRA G=4": "smora-G4",
            "base model (untrained)": "base-G0"}[label]


def test_the_other_metrics_get_their_own_holm_families(plan):
    from harness.analysis.comparisons import (
        item_scores,
        measures,
        metrics_significance_table,
        significance_table,
    )
    from harness.analysis.results import collect_results

    results = collect_results(plan)
    found = [(m.label, m.task) for m in measures(results)]
    assert found == [("suite Brier score ↓", None),
                     ("gsm8k exact match (strict-match) ↑", "gsm8k"),
                     ("gsm8k exact match (flexible-extract) ↑", "gsm8k")]
    # the primary per-item scores are read as before (bits -> floats)
    _seeds, scores, _groups = item_scores(results, "sira-G4")
    assert scores[0, :ITEMS].tolist() == [float(b) for b in item_bits(ACC[("sira-G4", 0)][0])]
    table = metrics_significance_table(results)
    primary = significance_table(results)
    n_pairs = len(primary)
    assert len(table) == 3 * n_pairs
    for _label, family in table.groupby("measure", sort=False):
        assert list(family["comparison"]) == list(primary["comparison"])  # the same comparisons
        # Holm within the metric's own family of n_pairs comparisons
        p = sorted(family["p_value"])
        assert min(family["p_holm"]) == pytest.approx(min(1.0, p[0] * n_pairs))
    brier = table[table["metric"] == "brier_score"].to_dict("records")
    for row in brier:
        a, b = _key_of(row["label"]), _key_of(row["versus"])
        expected = statistics.mean(
            statistics.mean(statistics.mean(BRIER[x] for x in item_bits(acc)) for acc in ACC[(a, s)])
            - statistics.mean(statistics.mean(BRIER[x] for x in item_bits(acc)) for acc in ACC[(b, s)])
            for s in (0, 1))
        assert row["diff"] == pytest.approx(expected, abs=1e-9)
        assert row["ci_low"] <= row["diff"] <= row["ci_high"] and row["n_items"] == 2 * ITEMS
        # lower is better: a decided negative difference is "better"
        if row["verdict"] != "no difference detected":
            assert row["verdict"] == ("better" if row["diff"] < 0 else "worse")
    decided = {r["label"]: r["verdict"] for r in brier if r["comparison"] == "vs LoRA rank R"}
    assert decided["SiRA G=4"] == "better"  # 10-12 pp more solved: a lower Brier score
    strict = table[table["metric"] == "exact_match,strict-match"].to_dict("records")
    for row in strict:
        a, b = _key_of(row["label"]), _key_of(row["versus"])
        expected = statistics.mean(
            (extra_bits(a, s)[0].count("1") - extra_bits(b, s)[0].count("1")) / 20 * 100 for s in (0, 1))
        assert row["diff"] == pytest.approx(expected, abs=1e-9) and row["n_items"] == 20
        assert row["task"] == "gsm8k"
    # the table's text: every metric named with its direction, the families stated
    from harness.analysis.tables import build_significance_metrics

    md = build_significance_metrics(results)["md"]
    assert "suite Brier score ↓" in md and "gsm8k exact match (flexible-extract) ↑" in md
    assert f"suite Brier score ↓: {n_pairs}" in md and "No interval for expected calibration error" in md


def test_a_metric_without_per_item_values_in_some_run_says_so(plan):
    from harness.analysis.comparisons import metrics_significance_table
    from harness.analysis.results import collect_results

    run = next(r for r in plan.runs if r.method == "smora" and r.tag == "G4")
    path = plan.run_dir(run) / "metrics.json"
    metrics = json.loads(path.read_text())
    del metrics["extra_items"]
    path.write_text(json.dumps(metrics))
    table = metrics_significance_table(collect_results(plan))
    rows = table[(table["task"] == "gsm8k") & ((table["label"] == "SMoRA G=4") | (table["versus"] == "SMoRA G=4"))]
    assert len(rows) and set(rows["verdict"]) == {"no per-item values stored"}
    assert rows["diff"].isna().all()


def test_extra_tasks_and_stored_sample_metrics_reach_summary_and_main_table(plan):
    from harness.analysis.comparisons import aggregate_only
    from harness.analysis.results import collect_results
    from harness.analysis.sample_metrics.ece import ece
    from harness.analysis.summary import summary_frame
    from harness.analysis.tables import main_table, main_table_texts

    summary = summary_frame(plan).set_index("run_id")
    run = next(r for r in plan.runs if r.method == "sira" and r.tag == "G4" and r.seed == 0)
    strict, flexible = extra_bits("sira-G4", 0)
    row = summary.loc[run.run_id]
    assert row["exact_match_strict-match_gsm8k"] == pytest.approx(strict.count("1") / 20)
    assert row["exact_match_flexible-extract_gsm8k"] == pytest.approx(flexible.count("1") / 20)
    assert row["exact_match_stderr_strict-match_gsm8k"] == pytest.approx(0.1)
    # ECE from the stored samples, per task and as the suite mean; absent where none were stored
    eces = [ece(mc_records(item_bits(acc))) for acc in ACC[("sira-G4", 0)]]
    assert row["ece_alpha"] == pytest.approx(eces[0]) and row["suite_ece"] == pytest.approx(sum(eces) / 2)
    smora = next(r for r in plan.runs if r.method == "smora")
    assert math.isnan(summary.loc[smora.run_id, "suite_ece"])
    results = collect_results(plan)
    assert sorted(results.with_samples) == sorted(r.run_id for r in plan.runs if r.method in WITH_SAMPLES)
    assert [m.name for m in aggregate_only(results)] == ["ece"]
    table = main_table(results).set_index("label")
    sira = table.loc["SiRA G=4"]
    assert sira["extra:gsm8k:exact_match,strict-match"] == pytest.approx(
        statistics.mean(extra_bits("sira-G4", s)[0].count("1") / 20 * 100 for s in (0, 1)))
    assert sira["suite:ece"] == pytest.approx(statistics.mean(
        statistics.mean(ece(mc_records(item_bits(acc))) for acc in ACC[("sira-G4", s)]) for s in (0, 1)))
    assert math.isnan(table.loc["SMoRA G=4", "suite:ece"])
    md = main_table_texts(results)["md"]
    assert "gsm8k exact match (strict-match) ↑" in md and "suite expected calibration error ↓" in md
    assert "stored samples (samples.json)" in md and "not part of the suite mean" in md


def test_a_samples_file_that_differs_from_its_record_is_never_used(plan):
    from harness.analysis.results import collect_results
    from harness.common.manifest import VerificationError

    run = next(r for r in plan.runs if r.method == "sira")
    path = plan.run_dir(run) / "samples.json"
    path.write_text(path.read_text().replace('"gold": 0', '"gold": 1', 1))
    with pytest.raises(VerificationError, match=r"samples\.json"):
        collect_results(plan)
