"""Which differences a study can claim: paired, hierarchical bootstrap comparisons over seeds
and test items, Holm-corrected over the family, and the granularity trend of each method.

Inputs are the per-item scores every evaluation stores (``metrics.json``: ``items``, each
task's primary metric, 0/1 per test item in doc order; any per-item float metric the same
way, :class:`Measure`), so a comparison resamples the two
sources of noise a reader cares about: which seeds were trained (data order and
initialisation) and which test items were drawn. The statistic is the suite score of the
tables (the unweighted mean over tasks of each task's accuracy), so the items of a task
weigh ``1 / (n_tasks * n_items_of_task)`` and are resampled within their task
(:mod:`harness.analysis.stats`).

The family (one Holm correction over all of it):

* every method x variant against the reference at rank R (LoRA, the same total parameters);
* per method run at several granularities, its finest against its coarsest granularity;
* per method, its best variant against the best variant of any other trained method;
* an ablation (a method with ``ablation_of``) against its parent at each shared granularity.

Verdict: "better" / "worse" only where the Holm-adjusted p-value is below 0.05 **and** the
family-wise (Bonferroni) interval excludes zero, so a claimed difference always has a
corrected interval that excludes zero; otherwise "no difference detected".

The trend: per method with >= 2 granularities, the least-squares slope of the suite score
against log2 G (percentage points per doubling of the number of experts) with its 95% CI,
and with >= 3 granularities the "middle bump" (the middle G against the mean of the ends),
from the same crossed bootstrap; the shape word follows :data:`harness.analysis.stats.SHAPE_RULE`.

The other metrics (:func:`metrics_significance_table`): every per-item metric beside the
suite score (a secondary metric's suite mean, e.g. lm-eval's Brier score, lower is better;
each metric of every registry task of ``eval.tasks`` beyond the suite, per lm-eval filter)
gets the same comparisons under the same resampling, one Holm family per metric, and
verdicts in the metric's direction (:mod:`harness.common.metrics`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harness.adapters import get_method
from harness.adapters.metrics import Metric
from harness.analysis.results import (
    StudyResults,
    base_key,
    extra_metric,
    extra_metric_keys,
    reference_key,
    row_label,
    variant_key,
)
from harness.analysis.stats import (
    SHAPE_RULE,
    UNIT_STRATIFIED,
    ci_half_width,
    estimate_components,
    granularity_trend,
    paired_bootstrap,
    paired_bootstraps,
    seeds_needed,
    task_weights,
    verdicts,
)
from harness.common.metrics import per_item, sample_metrics, task_metrics

if TYPE_CHECKING:
    from harness.plan.study import StudyPlan

ALPHA = 0.05
N_BOOT = 10_000
SEED = 0

#: what the tables say was resampled
UNIT = f"{UNIT_STRATIFIED}: seeds drawn with replacement, and test items drawn with replacement within each task"


@dataclass(frozen=True)
class Measure:
    """What one family of comparisons resamples: the per-item values stored under ``key``
    (``metrics.json``'s ``items``, or ``extra_items`` of ``task``) of the metric ``metric``
    (its declaration: label, unit, direction). ``task`` ``None``: the suite, the mean over the
    suite's tasks that store it, each task weighing the same; else one registry task of
    ``eval.tasks`` beyond the suite."""

    key: str
    metric: Metric
    task: str | None = None

    @property
    def label(self) -> str:
        arrow = {True: " ↑", False: " ↓"}.get(self.metric.higher_is_better, "")
        return (f"suite {self.metric.label}" if self.task is None else self.metric.label) + arrow


def item_scores(
    results: StudyResults, key: str, measure: Measure | None = None
) -> tuple[list[int], np.ndarray, list[str]] | None:
    """``(seeds, scores[seed, item], task of each item)`` of one method x variant, from the
    per-item values its evaluations stored: each task's primary metric (``measure`` ``None``)
    or the metric of ``measure``; ``None`` when a run has none."""
    runs = results.runs[results.runs["key"] == key].sort_values("seed")
    rows, seeds, groups = [], [], None
    for run_id, seed in zip(runs["run_id"], runs["seed"]):
        metrics = results.metrics[run_id]
        items = metrics.get("items")
        row, tasks = [], []
        if measure is None:
            if not items:
                return None
            for task in results.tasks:
                metric = (metrics["tasks"].get(task) or {}).get("primary", "acc")
                bits = (items.get(task) or {}).get(metric)
                if bits is None:
                    return None
                row += per_item(bits)
                tasks += [task] * len(bits)
        elif measure.task is None:
            for task in results.tasks:
                values = ((items or {}).get(task) or {}).get(measure.key)
                if values is not None:  # a task without it (the Brier score of mixed choice counts)
                    row += per_item(values)
                    tasks += [task] * len(values)
        else:
            values = ((metrics.get("extra_items") or {}).get(measure.task) or {}).get(measure.key)
            if values is not None:
                row, tasks = per_item(values), [measure.task] * len(values)
        if not row:
            return None
        if groups is None:
            groups = tasks
        elif tasks != groups:
            return None  # another test set: not comparable item by item
        rows.append(row)
        seeds.append(int(seed))
    if not rows:
        return None
    return seeds, np.asarray(rows, dtype=float), groups


def _has_items(m: Metric) -> bool:
    """Whether a metric has per-item values (read from lm-eval's samples, or computed per item
    from stored samples)."""
    rule = sample_metrics().get(m.name)
    return m.item is not None or (rule is not None and rule[1].per_item)


def measures(results: StudyResults) -> list[Measure]:
    """The metrics beside the suite score that some run reports: each secondary task metric
    the main table shows (``Metric.main_table``) with per-item values, as a suite mean, then
    every metric of every registry task of ``eval.tasks`` beyond the suite, in the order the
    runs report them."""
    out = []
    declared = [*task_metrics(), *(m for m, _ in sample_metrics().values())]
    for m in declared:
        if m.main_table and _has_items(m) and any(
            isinstance(((metrics.get("tasks") or {}).get(t) or {}).get(m.name), (int, float))
            for metrics in results.metrics.values() for t in results.tasks
        ):
            out.append(Measure(m.name, m))
    seen: dict[tuple[str, str], dict[str, Any]] = {}
    for metrics in results.metrics.values():
        for task, keys in extra_metric_keys(metrics).items():
            for k in keys:
                seen.setdefault((task, k), metrics)
    out += [Measure(k, extra_metric(metrics, task, k), task) for (task, k), metrics in seen.items()]
    return out


def aggregate_only(results: StudyResults) -> list[Metric]:
    """The metrics some run reports that have no per-item values (a calibration error over
    all items): the main table shows them, no interval does."""
    reported = {name for metrics in results.metrics.values()
                for values in (metrics.get("tasks") or {}).values() for name in values}
    return [m for m, rule in sample_metrics().values() if not rule.per_item and m.name in reported]


def _paired(a, b) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    """The two conditions on the seeds both ran (the untrained base model, one "seed", is
    paired with every seed)."""
    if a is None or b is None or a[2] != b[2]:
        return None
    (sa, xa, groups), (sb, xb, _) = a, b
    if len(sa) == 1 and len(sb) > 1:
        return np.repeat(xa, len(sb), axis=0), xb, groups
    if len(sb) == 1 and len(sa) > 1:
        return xa, np.repeat(xb, len(sa), axis=0), groups
    common = sorted(set(sa) & set(sb))
    if not common:
        return None
    return xa[[sa.index(s) for s in common]], xb[[sb.index(s) for s in common]], groups


def _suite_means(results: StudyResults) -> dict[str, float]:
    runs = results.runs.assign(acc=results.runs["suite_acc"].astype(float) * 100)
    return runs.groupby("key")["acc"].mean().to_dict()


def comparison_pairs(results: StudyResults) -> list[dict[str, Any]]:
    """The family: ``{comparison, key, versus_key}`` for every comparison the module docstring lists."""
    plan = results.plan
    means = _suite_means(results)
    base = base_key(plan)
    ref = reference_key(plan, "R")
    out = []
    if ref is not None:
        for key in results.keys:
            if key not in (ref, base):
                out.append({"comparison": "vs LoRA rank R", "key": key, "versus": ref})
    by_method: dict[str, list[tuple[int, str]]] = {}
    for row in plan.rows:
        if not row.reference_method:
            by_method.setdefault(row.method, []).append((row.variant.granularity, variant_key(row.method, row.variant.tag)))
    for variants in by_method.values():
        if len({g for g, _ in variants}) >= 2:
            coarse, fine = min(variants)[1], max(variants)[1]
            out.append({"comparison": "finest vs coarsest G", "key": fine, "versus": coarse})
    for row in plan.rows:
        parent = get_method(row.method).ablation_of
        if parent:
            key, versus = variant_key(row.method, row.variant.tag), variant_key(parent, row.variant.tag)
            if key in results.keys and versus in results.keys:
                out.append({"comparison": f"ablation vs {parent}", "key": key, "versus": versus})
    trained = [k for k in results.keys if k != base]
    best: dict[str, str] = {}
    for key in trained:
        method = key.split("-", 1)[0]
        if method not in best or means.get(key, -math.inf) > means.get(best[method], -math.inf):
            best[method] = key
    for method, key in best.items():
        others = [k for m, k in best.items() if m != method]
        if others:
            rival = max(others, key=lambda k: means.get(k, -math.inf))
            out.append({"comparison": "best vs best other method", "key": key, "versus": rival})
    return out


def training_gain_pairs(results: StudyResults) -> list[dict[str, Any]]:
    """A second family: every trained method x variant against the untrained base model
    (does training move the suite at all, and by more than the noise?)."""
    base = base_key(results.plan)
    if base is None or base not in results.keys:
        return []
    return [{"comparison": "vs base model", "key": key, "versus": base} for key in results.keys if key != base]


def _bootstrap_family(pairs: list[dict[str, Any]], scores: dict[str, Any], scale: float) -> list[dict[str, Any] | None]:
    """The paired bootstrap of every comparison of a family (``None`` where a side has no
    per-item values), in ``scale`` units (100: percentage points of a share). Comparisons of
    one shape on the same items share one set of draws (:func:`paired_bootstraps`: the same
    results as one call each)."""
    paired = [_paired(scores.get(spec["key"]), scores.get(spec["versus"])) for spec in pairs]
    batches: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(paired):
        if p is not None:
            batches.setdefault((p[0].shape, tuple(p[2])), []).append(i)
    raw: list[dict[str, Any] | None] = [None] * len(pairs)
    for indices in batches.values():
        groups = paired[indices[0]][2]
        done = paired_bootstraps(
            [(paired[i][0] * scale, paired[i][1] * scale) for i in indices], weights=task_weights(groups),
            groups=groups, n_boot=N_BOOT, seed=SEED, alpha=ALPHA, return_replicates=True,
        )
        for i, res in zip(indices, done):
            raw[i] = res
    return raw


def significance_table(results: StudyResults, family: str = "methods") -> pd.DataFrame:
    """One row per comparison of a family: ``comparison, label, versus, method, variant,
    n_seeds, n_items, diff, ci_low, ci_high, p_value, p_holm, ci_family_low,
    ci_family_high, verdict`` (differences in percentage points of the suite score).
    ``family``: ``methods`` (:func:`comparison_pairs`) or ``training`` (each trained run
    against the base model, :func:`training_gain_pairs`), each Holm-corrected on its own."""
    plan = results.plan
    scores = {key: item_scores(results, key) for key in results.keys}
    if family not in ("methods", "training"):
        raise ValueError(f"family must be 'methods' or 'training', got {family!r}")
    pairs = comparison_pairs(results) if family == "methods" else training_gain_pairs(results)
    raw = _bootstrap_family(pairs, scores, 100.0)
    decided = verdicts([r for r in raw if r is not None], ALPHA, rule="holm") if any(raw) else []
    it = iter(decided)
    records = []
    for spec, res in zip(pairs, raw):
        method, variant = spec["key"].split("-", 1)
        vm, vv = spec["versus"].split("-", 1)
        row: dict[str, Any] = {
            "comparison": spec["comparison"],
            "label": row_label(plan, method, variant),
            "versus": row_label(plan, vm, vv),
            "method": method,
            "variant": variant,
        }
        if res is None:
            row.update({"verdict": "no per-item scores stored: rerun the evaluation"})
        else:
            d = next(it)
            significant = d["verdict"] != "no difference detected" and d.get("family_ci_excludes_zero", False)
            row.update(
                {
                    "n_seeds": d["n_seeds"],
                    "n_items": d["n_items"],
                    "diff": d["diff"],
                    "ci_low": d["ci_low"],
                    "ci_high": d["ci_high"],
                    "p_value": d["p_value"],
                    "p_holm": d["p_holm"],
                    "ci_family_low": d.get("ci_family_low"),
                    "ci_family_high": d.get("ci_family_high"),
                    "verdict": d["verdict"] if significant else "no difference detected",
                }
            )
        records.append(row)
    columns = ["comparison", "label", "versus", "method", "variant", "n_seeds", "n_items", "diff",
               "ci_low", "ci_high", "p_value", "p_holm", "ci_family_low", "ci_family_high", "verdict"]
    return pd.DataFrame.from_records(records, columns=columns)


#: verdict words in a metric's direction (lower is better: the words swap; no direction:
#: which side is higher)
_DIRECTED = {
    True: {"better": "better", "worse": "worse"},
    False: {"better": "worse", "worse": "better"},
    None: {"better": "higher", "worse": "lower"},
}


def metrics_significance_table(results: StudyResults) -> pd.DataFrame:
    """The comparisons of :func:`comparison_pairs` for every metric beside the suite score
    (:func:`measures`), one row per metric x comparison, one Holm family per metric:
    ``measure, metric, task, higher_is_better, comparison, label, versus, method, variant,
    n_seeds, n_items, diff, ci_low, ci_high, p_value, p_holm, ci_family_low,
    ci_family_high, verdict``. Differences ``A - B`` in the metric's unit as the tables show it
    (percentage points for a share); the verdict follows the metric's direction (for the
    Brier score, a positive difference is "worse"; "higher"/"lower" for a metric without one)."""
    plan = results.plan
    pairs = comparison_pairs(results)
    records = []
    for measure in measures(results):
        scores = {key: item_scores(results, key, measure) for key in results.keys}
        raw = _bootstrap_family(pairs, scores, measure.metric.scale)
        decided = iter(verdicts([r for r in raw if r is not None], ALPHA, rule="holm") if any(raw) else [])
        words = _DIRECTED[measure.metric.higher_is_better]
        for spec, res in zip(pairs, raw):
            method, variant = spec["key"].split("-", 1)
            vm, vv = spec["versus"].split("-", 1)
            row: dict[str, Any] = {
                "measure": measure.label, "metric": measure.key, "task": measure.task or "suite",
                "higher_is_better": measure.metric.higher_is_better, "decimals": measure.metric.decimals,
                "comparison": spec["comparison"], "label": row_label(plan, method, variant),
                "versus": row_label(plan, vm, vv), "method": method, "variant": variant,
            }
            if res is None:
                row["verdict"] = "no per-item values stored"
            else:
                d = next(decided)
                significant = d["verdict"] != "no difference detected" and d.get("family_ci_excludes_zero", False)
                row.update({
                    "n_seeds": d["n_seeds"], "n_items": d["n_items"], "diff": d["diff"],
                    "ci_low": d["ci_low"], "ci_high": d["ci_high"], "p_value": d["p_value"],
                    "p_holm": d["p_holm"], "ci_family_low": d.get("ci_family_low"),
                    "ci_family_high": d.get("ci_family_high"),
                    "verdict": words[d["verdict"]] if significant else "no difference detected",
                })
            records.append(row)
    columns = ["measure", "metric", "task", "higher_is_better", "decimals", "comparison", "label", "versus",
               "method", "variant", "n_seeds", "n_items", "diff", "ci_low", "ci_high", "p_value", "p_holm",
               "ci_family_low", "ci_family_high", "verdict"]
    return pd.DataFrame.from_records(records, columns=columns)


def metrics_significance_display(table: pd.DataFrame) -> pd.DataFrame:
    def num(v: Any, places: int) -> str:
        return "–" if v is None or pd.isna(v) else f"{v:+.{places}f}"

    def ci(lo: Any, hi: Any, places: int) -> str:
        return "–" if lo is None or pd.isna(lo) else f"[{lo:+.{places}f}, {hi:+.{places}f}]"

    places = table["decimals"].astype(int)
    return pd.DataFrame({
        "metric": table["measure"],
        "comparison": table["comparison"],
        "method": table["label"],
        "versus": table["versus"],
        "seeds": table["n_seeds"].map(lambda v: "–" if pd.isna(v) else str(int(v))),
        "diff": [num(v, k) for v, k in zip(table["diff"], places)],
        "95% CI": [ci(lo, hi, k) for lo, hi, k in zip(table["ci_low"], table["ci_high"], places)],
        "family CI": [ci(lo, hi, k) for lo, hi, k in zip(table["ci_family_low"], table["ci_family_high"], places)],
        "p": table["p_value"].map(_p),
        "Holm p": table["p_holm"].map(_p),
        "verdict": table["verdict"],
    })


def metrics_significance_caption(results: StudyResults, table: pd.DataFrame) -> str:
    plan = results.plan
    families = table.groupby("measure", sort=False)["diff"].apply(lambda d: int(d.notna().sum())) if len(table) else {}
    sizes = ", ".join(f"{m}: {n}" for m, n in dict(families).items())
    aggregate = aggregate_only(results)
    stored = len(results.with_samples)
    return (
        f"Study {plan.config['study']}: the metrics beside the suite score, compared like it. Each "
        "secondary metric the main table shows, as its suite mean (the mean over the tasks that "
        "report it, each task weighing the same), and each metric of every registry task of "
        "eval.tasks beyond the suite (per lm-eval filter), over the comparisons of significance.md "
        "(each method x variant against LoRA rank R, finest against coarsest G, best against the "
        "best other method). diff: A − B in the metric's unit (percentage points for a share, the "
        f"score itself otherwise); unit of resampling: {UNIT}; paired, {N_BOOT:,} replicates, seed "
        f"{SEED}. Holm-corrected within each metric (one family per metric"
        + (f"; comparisons: {sizes}" if sizes else "") + "). ↑: higher is better, ↓: lower is "
        "better; better/worse follow that direction (higher/lower for a metric without one) and "
        "need Holm p < 0.05 and the family interval (Bonferroni) to exclude zero."
        + (f" No interval for {', '.join(m.label for m in aggregate)}: not a mean of per-item "
           "values (the main table shows it)." if aggregate else "")
        + (f" Metrics computed from stored samples (samples.json: {', '.join(sample_metrics())}) "
           "are absent: no run of this study stored its samples (runs evaluated before the "
           "harness kept them)." if not stored and sample_metrics() else
           (f" Metrics from stored samples: computed for the {stored} of {len(plan.runs)} runs "
            "that stored them." if stored < len(plan.runs) else ""))
    )


def general_text_scores(results: StudyResults, key: str) -> tuple[list[int], np.ndarray, np.ndarray] | None:
    """``(seeds, nll[seed, document], words[document])`` of one method x variant on the
    general text (``metrics.json``'s ``general_text``: each document's loss per word, nats);
    ``None`` when a run has none."""
    runs = results.runs[results.runs["key"] == key].sort_values("seed")
    rows, seeds, words = [], [], None
    for run_id, seed in zip(runs["run_id"], runs["seed"]):
        items = ((results.metrics[run_id].get("general_text") or {}).get("items")) or {}
        if not items.get("nll_per_word"):
            return None
        if words is None:
            words = np.asarray(items["words"], dtype=float)
        elif list(words) != items["words"]:
            return None  # another text: not comparable document by document
        rows.append(items["nll_per_word"])
        seeds.append(int(seed))
    if not rows:
        return None
    return seeds, np.asarray(rows, dtype=float), words


def forgetting_pairs(results: StudyResults) -> list[dict[str, Any]]:
    """The forgetting family: every trained method x variant against the untrained model
    (does fine-tuning raise the general text's loss?), and each method's finest against its
    coarsest granularity (does finer routing forget less?)."""
    base = base_key(results.plan)
    out = []
    if base is not None:
        out += [{"comparison": "vs base model", "key": k, "versus": base} for k in results.keys if k != base]
    out += [p for p in comparison_pairs(results) if p["comparison"] == "finest vs coarsest G"]
    return out


def forgetting_table(results: StudyResults) -> pd.DataFrame:
    """One row per comparison of the forgetting family (Holm-corrected on its own):
    ``comparison, label, versus, method, variant, n_seeds, n_documents, diff, ci_low, ci_high``
    (the difference of the loss per word on the general text, nats; resampled: seeds and
    documents, crossed, paired, documents weighted by their words, so the statistic is the
    log of the word perplexity), ``ppl_change`` and its interval (``exp(diff) - 1``, %),
    ``p_value, p_holm, ci_family_low, ci_family_high, verdict`` ("forgets more"/"forgets
    less"/"no difference detected")."""
    plan = results.plan
    pairs = forgetting_pairs(results)
    raw = []
    for spec in pairs:
        a, b = general_text_scores(results, spec["key"]), general_text_scores(results, spec["versus"])
        if a is None or b is None or not np.array_equal(a[2], b[2]):
            raw.append(None)
            continue
        xa, xb, _ = _paired((a[0], a[1], ["text"] * len(a[2])), (b[0], b[1], ["text"] * len(b[2])))
        raw.append(paired_bootstrap(xa, xb, weights=a[2], n_boot=N_BOOT, seed=SEED, alpha=ALPHA,
                                    return_replicates=True))
    decided = iter(verdicts([r for r in raw if r is not None], ALPHA, rule="holm") if any(raw) else [])
    records = []
    for spec, res in zip(pairs, raw):
        method, variant = spec["key"].split("-", 1)
        vm, vv = spec["versus"].split("-", 1)
        row: dict[str, Any] = {
            "comparison": spec["comparison"], "label": row_label(plan, method, variant),
            "versus": row_label(plan, vm, vv), "method": method, "variant": variant,
        }
        if res is not None:
            d = next(decided)
            significant = d["verdict"] != "no difference detected" and d.get("family_ci_excludes_zero", False)
            words = {"better": "forgets more", "worse": "forgets less"}
            row.update({
                "n_seeds": d["n_seeds"], "n_documents": d["n_items"],
                "diff": d["diff"], "ci_low": d["ci_low"], "ci_high": d["ci_high"],
                "ppl_change": math.expm1(d["diff"]) * 100,
                "ppl_change_low": math.expm1(d["ci_low"]) * 100,
                "ppl_change_high": math.expm1(d["ci_high"]) * 100,
                "p_value": d["p_value"], "p_holm": d["p_holm"],
                "ci_family_low": d.get("ci_family_low"), "ci_family_high": d.get("ci_family_high"),
                "verdict": words.get(d["verdict"], d["verdict"]) if significant else "no difference detected",
            })
        else:
            row["verdict"] = "no general-text scores stored (eval.general_text)"
        records.append(row)
    columns = ["comparison", "label", "versus", "method", "variant", "n_seeds", "n_documents", "diff",
               "ci_low", "ci_high", "ppl_change", "ppl_change_low", "ppl_change_high", "p_value",
               "p_holm", "ci_family_low", "ci_family_high", "verdict"]
    return pd.DataFrame.from_records(records, columns=columns)


def forgetting_display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({
        "comparison": table["comparison"],
        "method": table["label"],
        "versus": table["versus"],
        "Δ loss/word (nats)": [
            "–" if pd.isna(d) else f"{d:+.4f} [{lo:+.4f}, {hi:+.4f}]"
            for d, lo, hi in zip(table["diff"], table["ci_low"], table["ci_high"])
        ],
        "word ppl change (%)": [
            "–" if pd.isna(d) else f"{d:+.1f} [{lo:+.1f}, {hi:+.1f}]"
            for d, lo, hi in zip(table["ppl_change"], table["ppl_change_low"], table["ppl_change_high"])
        ],
        "Holm p": table["p_holm"].map(_p),
        "verdict": table["verdict"],
    })


def forgetting_caption(plan: StudyPlan, table: pd.DataFrame) -> str:
    text = plan.config["eval"].get("general_text") or "(none configured)"
    return (
        f"Study {plan.config['study']}: forgetting, as peft's method comparison measures it: the "
        f"change of the loss per word on a general text ({text}, scored by lm-eval's "
        "loglikelihood_rolling as its wikitext task) against the untrained model, and finest "
        "against coarsest granularity. Difference of the mean loss per word (nats; documents "
        "weighted by their words, so exp of it is the word perplexity ratio), 95% interval of a "
        f"paired bootstrap over seeds and documents ({N_BOOT:,} replicates), Holm-corrected over "
        f"the {len(table)} comparisons; a verdict needs the Holm p below {ALPHA} and the "
        "family-wise interval to exclude zero."
    )


def trend_table(results: StudyResults) -> pd.DataFrame:
    """Per method with >= 2 granularities: its suite score at each G, the slope per doubling
    of G and (>= 3 granularities) the middle bump, each with its 95% CI, and the shape."""
    plan = results.plan
    records = []
    by_method: dict[str, list[tuple[int, str]]] = {}
    for row in plan.rows:
        if not row.reference_method:
            by_method.setdefault(row.method, []).append((row.variant.granularity, variant_key(row.method, row.variant.tag)))
    for method, variants in by_method.items():
        grans = sorted({g for g, _ in variants})
        if len(grans) < 2:
            continue
        per_g = {g: item_scores(results, key) for g, key in sorted(variants)}
        if any(v is None for v in per_g.values()):
            continue
        common = sorted(set.intersection(*(set(v[0]) for v in per_g.values())))
        groups = next(iter(per_g.values()))[2]
        arrays = {g: v[1][[v[0].index(s) for s in common]] * 100 for g, v in per_g.items()}
        trend = granularity_trend(arrays, weights=task_weights(groups), groups=groups, n_boot=N_BOOT,
                                  seed=SEED, alpha=ALPHA)
        record = {
            "method": method,
            "label": row_label(plan, method, "").strip(),
            "granularities": " ".join(map(str, grans)),
            "n_seeds": len(common),
            **{f"G{g}": trend["means"][g] for g in grans},
            "slope": trend["slope"],
            "slope_ci_low": trend["slope_ci_low"],
            "slope_ci_high": trend["slope_ci_high"],
            "bump": trend.get("bump"),
            "bump_ci_low": trend.get("bump_ci_low"),
            "bump_ci_high": trend.get("bump_ci_high"),
            "shape": trend["shape"],
        }
        records.append(record)
    return pd.DataFrame.from_records(records)


#: the interval half-width (percentage points) the power table asks how many seeds reach
TARGET_HALF_WIDTH = 3.0


def power_table(results: StudyResults, target: float = TARGET_HALF_WIDTH) -> pd.DataFrame:
    """How many seeds the family's comparisons need: per comparison run on >= 2 seeds, the
    variance components of the paired difference (between seeds, and over test items) from
    the stored per-item scores (:func:`harness.analysis.stats.estimate_components`, as the crossed
    bootstrap will see them), the expected 95% half-width at this study's seeds and at
    twice as many, the seeds for a half-width of ``target`` pp and the seeds for the
    half-width to fall below the observed difference (``None``: more seeds cannot reach it
    on this test set; more test items would)."""
    scores = {key: item_scores(results, key) for key in results.keys}
    records = []
    for spec in comparison_pairs(results):
        paired = _paired(scores.get(spec["key"]), scores.get(spec["versus"]))
        if paired is None or paired[0].shape[0] < 2 or spec["versus"] == base_key(results.plan):
            continue
        a, b, groups = paired
        w = task_weights(groups)
        var_seed, var_item = estimate_components(a * 100, b * 100, weights=w, groups=groups)
        n_seeds, n_items = a.shape
        diff = float(((a - b) * 100 @ w).mean())
        records.append({
            "comparison": spec["comparison"],
            "label": row_label(results.plan, *spec["key"].split("-", 1)),
            "versus": row_label(results.plan, *spec["versus"].split("-", 1)),
            "n_seeds": n_seeds,
            "diff": diff,
            "sd_seed": math.sqrt(var_seed),
            "half_width": ci_half_width(var_seed, var_item, n_seeds, n_items),
            "half_width_2x": ci_half_width(var_seed, var_item, 2 * n_seeds, n_items),
            "seeds_for_target": seeds_needed(target, var_seed, var_item, n_items),
            "seeds_to_resolve": seeds_needed(abs(diff), var_seed, var_item, n_items) if abs(diff) > 0 else None,
        })
    return pd.DataFrame.from_records(records)


def power_texts(plan: StudyPlan, table: pd.DataFrame, target: float = TARGET_HALF_WIDTH) -> dict[str, str]:
    caption = (
        f"Study {plan.config['study']}: seeds the comparisons need (harness.analysis.stats.estimate_components "
        "on the stored per-item scores; normal approximation of the crossed bootstrap's 95% interval, "
        f"same test items). Half-width at this study's seeds and at twice as many; seeds for a "
        f"half-width of {target:g} pp; seeds for the half-width to fall below the observed difference "
        "(– : more seeds cannot, on this test set). Uncorrected for the number of comparisons."
    )
    if table.empty:
        return {"csv": "", "md": caption + "\n\n(no comparison with two or more seeds)\n"}
    def seeds(v):
        return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else str(int(v))
    shown = pd.DataFrame({
        "comparison": table["comparison"],
        "method": table["label"],
        "versus": table["versus"],
        "seeds": table["n_seeds"].astype(str),
        "diff (pp)": table["diff"].map(lambda v: f"{v:+.1f}"),
        "seed sd (pp)": table["sd_seed"].map(lambda v: f"{v:.1f}"),
        "± now": table["half_width"].map(lambda v: f"{v:.1f}"),
        "± at 2x seeds": table["half_width_2x"].map(lambda v: f"{v:.1f}"),
        f"seeds for ±{target:g}": table["seeds_for_target"].map(seeds),
        "seeds to resolve diff": table["seeds_to_resolve"].map(seeds),
    })
    return {"csv": table.to_csv(index=False), "md": caption + "\n\n" + shown.to_markdown(index=False) + "\n"}


def _pp(v: Any, sign: bool = True) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:+.1f}" if sign else f"{v:.1f}"


def _ci(lo: Any, hi: Any) -> str:
    if lo is None or hi is None or (isinstance(lo, float) and math.isnan(lo)):
        return "–"
    return f"[{lo:+.1f}, {hi:+.1f}]"


def _p(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{v:.4f}" if v >= 1e-4 else f"{v:.1e}"


def significance_display(table: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "comparison": table["comparison"],
            "method": table["label"],
            "versus": table["versus"],
            "seeds": table["n_seeds"].map(lambda v: "–" if pd.isna(v) else str(int(v))),
            "diff (pp)": table["diff"].map(_pp),
            "95% CI": [_ci(lo, hi) for lo, hi in zip(table["ci_low"], table["ci_high"])],
            "family CI": [_ci(lo, hi) for lo, hi in zip(table["ci_family_low"], table["ci_family_high"])],
            "p": table["p_value"].map(_p),
            "Holm p": table["p_holm"].map(_p),
            "verdict": table["verdict"],
        }
    )


def significance_caption(plan: StudyPlan, table: pd.DataFrame, family: str = "methods") -> str:
    m = int(table["diff"].notna().sum()) if len(table) else 0
    what = ("each trained method x variant against the untrained base model (a family of its own): "
            if family == "training" else "")
    return (
        f"Study {plan.config['study']}: {what}differences of the suite score (percentage points, the "
        f"mean over tasks of each task's primary metric), {len(plan.config['train']['seeds'])} "
        f"seed(s). Unit of resampling: {UNIT}; paired (the same seeds and items for both sides), "
        f"{N_BOOT:,} replicates, seed {SEED}. 95% CI: percentile interval; p: two-sided bootstrap "
        f"p-value (never 0); Holm p: adjusted over the family of {m} comparisons; family CI: the "
        f"Bonferroni interval at level 1 - 0.05/{max(m, 1)}. Verdict better/worse only where "
        "Holm p < 0.05 and the family CI excludes zero; otherwise no difference detected."
    )


def trend_display(table: pd.DataFrame) -> pd.DataFrame:
    if table.empty:
        return table
    g_cols = [c for c in table if c.startswith("G") and c[1:].isdigit()]
    shown = pd.DataFrame({"method": table["label"], "seeds": table["n_seeds"].astype(str)})
    for c in g_cols:
        shown[f"G={c[1:]}"] = table[c].map(lambda v: _pp(v, sign=False))
    shown["slope (pp / doubling)"] = [f"{_pp(s)} {_ci(lo, hi)}" for s, lo, hi in
                                      zip(table["slope"], table["slope_ci_low"], table["slope_ci_high"])]
    shown["middle bump (pp)"] = [
        "–" if b is None or (isinstance(b, float) and math.isnan(b)) else f"{_pp(b)} {_ci(lo, hi)}"
        for b, lo, hi in zip(table["bump"], table["bump_ci_low"], table["bump_ci_high"])
    ]
    shown["shape"] = table["shape"]
    return shown


def trend_caption(plan: StudyPlan) -> str:
    return (
        f"Study {plan.config['study']}: suite score (%) against the number of experts G at fixed "
        "total and active rank. Slope: least squares against log2 G (pp per doubling of G); "
        "middle bump: the middle G against the mean of the smallest and largest. 95% CIs from "
        f"the same paired bootstrap (unit: {UNIT}; the same seeds and items at every G). "
        f"Shape: {SHAPE_RULE}."
    )
