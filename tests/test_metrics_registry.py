"""The metric and output registries: metrics declared once (lm-eval's and those computed from
stored samples, such as ECE), what evaluation keeps per item (stored samples, the extra
registry tasks' per-item values per lm-eval filter), and the tables and figures bound to their
builders by reference, listed by the CLI help. Unit tests on small dicts (no model, no
lm-eval run)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import harness.analysis.sample_metrics  # registers ECE
from harness.adapters.metrics import Metric
from harness.common import metrics as registry
from harness.common.metrics import from_samples, register_metric, sample_metrics, stored_samples

# -- lm-eval's logged samples, as lm-eval 0.4 hands them to the harness ----------------------


def mc_sample(doc_id: int, lls: list[float], target, filter_: str = "none") -> dict:
    """A multiple-choice sample: one (log-likelihood, is_greedy) per choice."""
    gold = target if isinstance(target, int) else 0
    best = int(np.argmax(lls))
    probs = np.exp(np.asarray(lls) - max(lls))
    probs = probs / probs.sum()
    return {
        "doc_id": doc_id, "doc": {"question": "q"}, "target": target,
        "arguments": [("ctx", f" c{i}") for i in range(len(lls))],
        "resps": [[(ll, False)] for ll in lls], "filtered_resps": [(ll, False) for ll in lls],
        "filter": filter_, "metrics": ["acc", "acc_norm", "brier_score"],
        "acc": float(best == gold), "acc_norm": float(best == gold), "brier_score": (gold, probs),
    }


def gen_sample(doc_id: int, target: str, raw: str, filtered: str, filter_: str) -> dict:
    """A generate_until sample of one filter (gsm8k's strict-match / flexible-extract)."""
    return {
        "doc_id": doc_id, "doc": {"question": "q"}, "target": target, "arguments": [("ctx", {"until": ["\n"]})],
        "resps": [[raw]], "filtered_resps": [filtered], "filter": filter_, "metrics": ["exact_match"],
        "exact_match": np.float64(float(filtered == target)),
    }


# -- ECE: one file (harness/analysis/sample_metrics/ece.py) and this test ---------------------


def ece_by_hand(items: list[tuple[list[float], int]], bins: int = 10) -> float:
    """ECE with the standard library: softmax confidence, equal-width bins (k/B, (k+1)/B]."""
    rows = []
    for lls, gold in items:
        top = max(lls)
        weights = [math.exp(v - top) for v in lls]
        p = max(weights) / sum(weights)
        rows.append((p, lls.index(top) == gold))
    total = 0.0
    for k in range(bins):
        inside = [(p, c) for p, c in rows if (k == 0 and p == 0) or k / bins < p <= (k + 1) / bins]
        if inside:
            total += len(inside) / len(rows) * abs(sum(c for _, c in inside) / len(inside)
                                                   - sum(p for p, _ in inside) / len(inside))
    return total


def test_ece_is_computed_from_the_stored_choice_loglikelihoods():
    from harness.analysis.sample_metrics.ece import ece

    # two choices: confidence 1 / (1 + e^-d) for a log-likelihood gap d
    items = [([0.0, -math.log(9)], 0),   # p = 0.9, right
             ([0.0, -math.log(9)], 1),   # p = 0.9, wrong
             ([0.0, -math.log(3)], 0),   # p = 0.75, right
             ([-1.0, -1.0], 0),          # p = 0.5, tie: the first choice, right
             ([-5.0, 0.0, -5.0], 2)]     # p ~ 0.987, wrong
    records = [{"doc_id": i, "gold": g, "loglikelihoods": lls, "is_greedy": [False] * len(lls)}
               for i, (lls, g) in enumerate(items)]
    # bins: 0.9 x2 -> |1/2 - 0.9|; 0.75 -> |1 - 0.75|; 0.5 -> |1 - 0.5|; 0.987 -> |0 - 0.987|
    p5 = 1 / (1 + 2 * math.exp(-5))
    expected = (2 * 0.4 + 0.25 + 0.5 + p5) / 5
    assert ece(records) == pytest.approx(expected, rel=1e-12)
    assert ece(records) == pytest.approx(ece_by_hand(items), rel=1e-12)
    # a perfectly calibrated set: confidence 1.0 and right
    assert ece([{"doc_id": 0, "gold": 0, "loglikelihoods": [0.0, -1e9]}]) == pytest.approx(0.0)
    # nothing to compute on: no gold index
    assert ece([{"doc_id": 0, "gold": None, "loglikelihoods": [0.0, -1.0]}]) is None
    # it is registered at its definition, as a lower-is-better score with a main-table column
    declared, rule = sample_metrics()["ece"]
    assert registry.metric("ece") is declared and declared.higher_is_better is False
    assert declared.main_table and not rule.per_item and rule.output_types == ("multiple_choice",)


def test_every_module_of_the_sample_metrics_package_is_imported_with_it():
    from pathlib import Path

    from harness.analysis.sample_metrics import MODULES

    folder = Path(harness.analysis.sample_metrics.__file__).parent
    files = sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))
    assert [m.__name__.rsplit(".", 1)[1] for m in MODULES] == files
    defined_in = {rule.compute.__module__ for _, rule in sample_metrics().values()}
    assert {m.__name__ for m in MODULES} <= defined_in


@pytest.fixture
def scratch_metric():
    """Registers and removes a per-item metric computed from stored samples (the log loss of
    the gold choice), as a module of harness/analysis/sample_metrics would."""
    name = "gold_nll"

    def gold_nll(items):
        out = []
        for item in items:
            lls = item["loglikelihoods"]
            top = max(lls)
            log_z = top + math.log(sum(math.exp(v - top) for v in lls))
            out.append(log_z - lls[item["gold"]])
        return out

    register_metric(Metric(name, "gold log loss", unit="nats", higher_is_better=False, decimals=3,
                           main_table=True), per_item=True)(gold_nll)
    yield name
    registry._registry.pop(name)
    registry._from_samples.pop(name)


def test_a_metric_is_one_decorated_function_and_is_computed_per_filter(scratch_metric):
    entry = stored_samples("multiple_choice", [mc_sample(1, [-2.0, -1.0], 1), mc_sample(0, [-1.0, -3.0], 0)])
    assert [r["doc_id"] for r in entry["filters"]["none"]] == [0, 1]  # doc order
    got = from_samples(entry)["none"]
    value, items = got[scratch_metric]
    expected = [math.log(1 + math.exp(-2)), math.log(1 + math.exp(-1))]
    assert items == pytest.approx(expected, abs=1e-6) and value == pytest.approx(sum(expected) / 2)
    assert got["ece"][1] is None  # an aggregate: no per-item values
    # a generation entry: neither applies (output_types)
    gen = stored_samples("generate_until", [gen_sample(0, "4", "4", "4", "none")])
    assert from_samples(gen) == {}


def test_a_metric_name_is_declared_once():
    with pytest.raises(ValueError, match="already declared"):
        register_metric(Metric("brier_score", "mine"))(lambda items: 0.0)
    with pytest.raises(ValueError, match="neither lm_eval nor item"):
        register_metric(Metric("mine", "mine", lm_eval=True))(lambda items: 0.0)
    assert "mine" not in registry.registered()
    with pytest.raises(ValueError, match="built in"):
        registry.register_method_metrics([Metric("ece", "a method's ece")])


def test_stored_samples_keep_predictions_per_filter_as_plain_json():
    mc = stored_samples("multiple_choice", [mc_sample(0, [-1.5, -0.5, -2.0], 1)])
    ((record,),) = mc["filters"].values()
    assert record == {"doc_id": 0, "gold": 1, "loglikelihoods": [-1.5, -0.5, -2.0], "is_greedy": [False] * 3}
    # a string target that names a choice (its continuation) becomes that choice's index
    named = mc_sample(0, [-1.0, -2.0], "c1")
    assert stored_samples("multiple_choice", [named])["filters"]["none"][0]["gold"] == 1
    assert stored_samples("multiple_choice", [mc_sample(0, [-1.0, -2.0], "1")])["filters"]["none"][0]["gold"] == 1
    # gsm8k-like: two filters, the raw generation and each filter's answer
    gen = stored_samples("generate_until", [
        gen_sample(0, "42", "so #### 42", "42", "strict-match"),
        gen_sample(0, "42", "so #### 42", "42", "flexible-extract"),
        gen_sample(1, "7", "maybe 7", "[invalid]", "strict-match"),
        gen_sample(1, "7", "maybe 7", "7", "flexible-extract"),
    ])
    assert list(gen["filters"]) == ["strict-match", "flexible-extract"]
    assert gen["filters"]["strict-match"][1] == {"doc_id": 1, "target": "7", "response": "[invalid]",
                                                 "raw": "maybe 7"}
    assert json.loads(json.dumps(gen)) == gen and json.loads(json.dumps(mc)) == mc


def test_extra_tasks_keep_per_item_values_of_every_mean_metric_per_filter():
    from harness.run.evaluate import extra_item_scores, item_scores

    samples = [
        gen_sample(0, "42", "#### 42", "42", "strict-match"), gen_sample(0, "42", "#### 42", "42", "flexible-extract"),
        gen_sample(1, "7", "maybe 7", "[invalid]", "strict-match"), gen_sample(1, "7", "maybe 7", "7", "flexible-extract"),
        gen_sample(2, "3", "#### 4", "4", "strict-match"), gen_sample(2, "3", "#### 4", "4", "flexible-extract"),
    ]
    for s in samples:  # a corpus metric: lm-eval keeps (gold, prediction) pairs, no per-item value
        s["metrics"] = ["exact_match", "f1"]
        s["f1"] = (s["target"], s["filtered_resps"][0])
    result = {"exact_match,strict-match": 1 / 3, "exact_match_stderr,strict-match": 0.33,
              "exact_match,flexible-extract": 2 / 3, "f1,strict-match": 0.4, "f1,flexible-extract": 0.7}
    assert extra_item_scores(result, samples) == {
        "exact_match,strict-match": "100", "exact_match,flexible-extract": "110"}
    # a value that is not the mean of its items (another aggregation) is left out
    assert "exact_match,strict-match" not in extra_item_scores({**result, "exact_match,strict-match": 0.9}, samples)
    # a registered metric is read with its declared reader (the Brier score from (gold, probs))
    mc = [mc_sample(i, lls, 0) for i, lls in enumerate(([-0.1, -3.0], [-2.0, -0.2], [-1.0, -1.1]))]
    briers = [registry.brier_item(s) for s in mc]
    got = extra_item_scores({"acc,none": 2 / 3, "acc_norm,none": 2 / 3, "brier_score,none": sum(briers) / 3}, mc)
    assert got["acc,none"] == "101" and got["brier_score,none"] == pytest.approx(briers, abs=1e-6)
    # a suite task's per-item values come from one filter, never a mix of two
    assert item_scores(samples) == {"exact_match": "100"}


def test_summary_names_a_column_per_extra_task_and_metric():
    from harness.analysis.summary import _column

    assert _column("extra:gsm8k:exact_match,strict-match") == "exact_match_strict-match_gsm8k"
    assert _column("extra:arc_easy:acc,none") == "acc_arc_easy"
    assert _column("extra:gsm8k:exact_match_stderr,flexible-extract") == "exact_match_stderr_flexible-extract_gsm8k"
    assert _column("lm:ece:animal") == "ece_animal" and _column("suite:ece") == "suite_ece"


def test_extra_metrics_take_the_registry_direction_else_lm_evals():
    from harness.analysis.results import extra_metric

    recorded = {"extra_higher_is_better": {"gsm8k": {"exact_match": True}, "wiki": {"word_perplexity": False}}}
    em = extra_metric(recorded, "gsm8k", "exact_match,strict-match")
    assert (em.label, em.unit, em.higher_is_better) == ("gsm8k exact match (strict-match)", "share", True)
    ppl = extra_metric(recorded, "wiki", "word_perplexity,none")
    assert (ppl.label, ppl.scale, ppl.higher_is_better) == ("wiki word perplexity", 1.0, False)
    assert extra_metric(None, "x", "brier_score,none").higher_is_better is False  # the registry's
    assert extra_metric(None, "x", "mcc,none").higher_is_better is None


# -- tables and figures: declared once, builders bound by reference ---------------------------


def test_every_declared_output_has_its_builder_bound_by_reference():
    import harness.analysis.figures as figures
    import harness.analysis.tables as tables
    from harness.analysis.outputs import OUTPUTS, table_builder

    for out in OUTPUTS:
        module = tables if out.kind == "table" else figures
        builder = out.build()
        assert getattr(module, builder.__name__) is builder, out.name
    with pytest.raises(LookupError, match="no table named 'nowhere'"):
        table_builder("nowhere")(lambda results: {})


def test_cli_help_lists_every_table_figure_and_metric():
    import argparse

    from harness.analysis.outputs import outputs
    from harness.cli.outputs import add_commands

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_commands(sub)
    helps = {a.dest: a.help for a in sub._choices_actions}
    tables_help = sub.choices["tables"].format_help()
    figures_help = sub.choices["figures"].format_help()
    for out in outputs("table"):
        assert out.name in helps["tables"] and f"  {out.name} " in tables_help
    for out in outputs("figure"):
        assert out.name in helps["figures"] and f"  {out.name} " in figures_help
    for name in registry.registered():
        assert f"  {name} " in tables_help
    assert "from stored samples" in tables_help
