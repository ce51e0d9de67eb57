"""Tables regenerated from stored run results (pandas; CSV, Markdown and LaTeX).

The stored results come from the one reader, :func:`harness.analysis.results.collect_results`
(it never trains or evaluates; a missing file is reported by run id and file name).

Tables, written to ``{out_dir}/tables/`` by :func:`write_tables`:

* ``main_table``: one row per method x variant (granularity ``G``, or LoRA
  rank), always with the LoRA references (rank R: same total; rank K: same
  activated) and the untrained base model. Accuracies are in percent. For a
  row with seeds ``s = 1..n`` and per-seed accuracies ``a_s``:

  - task and suite columns: the mean over seeds, ``mean = (1/n) sum_s a_s``;
  - ``suite_std``: the sample standard deviation over seeds,
    ``std = sqrt( sum_s (a_s - mean)^2 / (n - 1) )`` (``ddof = 1``; NaN when
    ``n = 1``), shown as ``mean ± std`` in Markdown and LaTeX;
  - a method's scalar evaluation metrics (``metrics.json``'s ``method_metrics``, e.g. a
    router's accuracy at picking the item's task adapter), mean over seeds, in the unit the
    method declares (``Method.metrics``: a share in percent, a count as is); blank for other
    methods and absent when no run reports them;
  - the suite mean of every secondary task metric the registry marks for the main table
    (:mod:`harness.common.metrics`, e.g. lm-eval's Brier score; lower is better; the expected
    calibration error where runs stored their samples), mean over seeds;
  - each metric of every registry task of ``eval.tasks`` beyond the suite (per lm-eval
    filter), mean over seeds, outside the suite mean;
  - parameters (total, activated, router) from ``train.json`` (what really
    trained), the accounting mode ``router: separate|counted``, and the mean
    training wall time over seeds (for a run built on components trained by earlier
    jobs, those jobs' wall times are included: every stage).

  The suite score of one run is ``metrics.json``'s ``suite_acc`` (lm-eval's
  group score); where lm-eval recorded none, the unweighted mean of the task
  accuracies. The best value of each score column is **bold** in Markdown and
  ``\\textbf`` in LaTeX; ties at the displayed precision are all marked.

* ``budget_table``: the solver's rows for the study (one per method x variant),
  with counts checked against real layers built on the ``meta`` device.

* ``significance``: every comparison of the study's family (each method x variant against
  LoRA rank R; finest against coarsest granularity per method; each method's best variant
  against the best other method) with the difference of the suite score, its 95% CI from
  a paired bootstrap over seeds and test items, the bootstrap p-value, the Holm-adjusted
  p-value and the verdict (:mod:`harness.analysis.comparisons`, which states every formula).

* ``significance_metrics``: the same comparisons for every other per-item metric (a
  secondary metric's suite mean such as the Brier score; each metric of every registry task
  of ``eval.tasks`` beyond the suite, per lm-eval filter), one Holm family per metric, verdicts
  in the metric's direction (:func:`harness.analysis.comparisons.metrics_significance_table`).

* ``granularity_trend``: per method run at several granularities, its score at each G, the
  slope per doubling of G and the middle bump with their CIs, and the curve's shape.

* ``provenance``: per run, the commit, the engine code it trained under (this checkout's,
  other, or not recorded), package versions, device and wall times
  recorded with the results.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from harness.analysis.comparisons import (
    forgetting_caption,
    forgetting_display,
    forgetting_table,
    metrics_significance_caption,
    metrics_significance_display,
    metrics_significance_table,
    power_table,
    power_texts,
    significance_caption,
    significance_display,
    significance_table,
    trend_caption,
    trend_display,
    trend_table,
)
from harness.analysis.outputs import outputs, table_builder, write_caption
from harness.analysis.results import (
    StudyResults,
    collect_results,
    extra_metric,
    primary_metrics,
    reference_key,
    row_label,
    variant_key,
)
from harness.analysis.sharing import sharing_table
from harness.common.files import atomic_write_text, read_json
from harness.common.metrics import GENERATION_METRICS, metric, sample_metrics, task_metrics
from harness.common.render import (
    ACC_DECIMALS,
    best_cells,
    fmt_acc,
    fmt_int,
    fmt_seconds,
    md_bold,
    tex_escape,
    to_latex,
)
from harness.plan.budget_table import budget_frame, budget_table_texts, verified_budget
from harness.plan.status import engine_code, engine_mix

if TYPE_CHECKING:
    from harness.plan.study import StudyPlan

# -- the main table ------------------------------------------------------------------------


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    """The methods' scalar evaluation metrics that some run of the study reports."""
    return [c for c in runs if c.startswith("metric:") and runs[c].notna().any()]


#: the measured cost the main table shows (``cost:<field>`` of the results reader)
MAIN_COST = ("tokens_per_s", "peak_rss_mib", "cuda_max_allocated_mib", "adapter_bytes")
MAIN_COST_SHOWN = {
    "forgetting": ("forgetting (%)", lambda v: f"{v:+.1f}"),
    "cost:tokens_per_s": ("tokens/s", lambda v: f"{v:,.0f}"),
    "cost:peak_rss_mib": ("peak RSS (MiB)", lambda v: f"{v:,.0f}"),
    "cost:cuda_max_allocated_mib": ("peak CUDA (MiB)", lambda v: f"{v:,.0f}"),
    "cost:adapter_bytes": ("adapter (KiB)", lambda v: f"{v / 1024:,.0f}"),
}


def _suite_metric_columns(runs: pd.DataFrame) -> list[str]:
    """The secondary task metrics (``Metric.main_table``) some run reports, as suite means."""
    return [c for c in runs if c.startswith("suite:") and runs[c].notna().any()]


def _extra_columns(runs: pd.DataFrame) -> list[str]:
    """The metrics of the registry tasks of ``eval.tasks`` beyond the suite some run reports
    (``extra:<task>:<metric,filter>``; stderrs left out)."""
    return [c for c in runs if c.startswith("extra:") and "_stderr," not in c and runs[c].notna().any()]


def extra_declaration(results: StudyResults, column: str):
    """The declaration (:func:`harness.analysis.results.extra_metric`) of an ``extra:`` column."""
    _, task, key = column.split(":", 2)
    recorded = next((m for m in results.metrics.values() if key in (m.get("extra_tasks") or {}).get(task, {})), None)
    return extra_metric(recorded, task, key)


def _notes(plan: StudyPlan) -> dict[str, str]:
    return {variant_key(r.method, r.variant.tag): r.as_dict()["note"] for r in plan.rows}


def main_table(results: StudyResults) -> pd.DataFrame:
    """One row per method x variant, in :attr:`StudyResults.keys` order.

    Columns: ``label, method, variant, granularity, n_seeds``, one column per task (mean
    accuracy over seeds, %), ``suite_mean`` and ``suite_std`` (%, sample std over seeds,
    ddof = 1), ``metric:<name>`` (a method's scalar evaluation metric such as a router's
    accuracy, mean over seeds, in its declared unit; only when some run reports it, NaN for
    other methods), ``suite:<metric>`` (a secondary task metric's suite mean), ``total,
    activated, router`` (parameters), ``router_mode``, ``train_s`` (mean training wall time
    over seeds, s; NaN for the base model) and ``note``.
    """
    plan = results.plan
    runs = results.runs
    notes = _notes(plan)
    router_mode = plan.config["budget"]["router"]
    records = []
    for key in results.keys:
        group = runs[runs["key"] == key]
        if group.empty:  # the plan always has the runs collect_results checked; guard anyway
            continue
        first = group.iloc[0]
        suite = group["suite_acc"].astype(float) * 100
        record = {
            "label": row_label(plan, first["method"], first["variant"]),
            "method": first["method"],
            "variant": first["variant"],
            "granularity": int(first["granularity"]),
            "n_seeds": len(group),
        }
        for task in results.tasks:
            record[task] = group[f"acc:{task}"].astype(float).mean() * 100
        record["suite_mean"] = suite.mean()
        record["suite_std"] = suite.std(ddof=1) if len(group) > 1 else math.nan
        record["effective_experts"] = group["effective_experts"].astype(float).mean()
        for col in [*_metric_columns(runs), *_suite_metric_columns(runs)]:
            # in the unit the tables show (a share in percent): metric(name).scale
            scale = metric(col.partition(":")[2]).scale
            record[col] = group[col].astype(float).mean() * scale
        for col in _extra_columns(runs):  # a registry task beyond the suite: not in suite_mean
            record[col] = group[col].astype(float).mean() * extra_declaration(results, col).scale
        for col in ("total", "activated", "router"):
            record[col] = None if pd.isna(first[col]) else int(first[col])
        record["router_mode"] = router_mode
        record["train_s"] = group["train_s"].astype(float).mean()
        # the general text's word perplexity relative to the untrained model's (%), and the
        # measured cost of training (mean over seeds; absent when no run recorded them)
        for col in ("forgetting", *[f"cost:{k}" for k in MAIN_COST]):
            if col in runs and runs[col].notna().any():
                values = group[col].astype(float)
                record[col] = values.mean() * (100 if col == "forgetting" else 1)
        record["note"] = (
            "untrained: no adapter" if first["method"] == "base" else notes.get(key, "")
        )
        records.append(record)
    for name, label in (("majority", "majority-class baseline"), ("chance", "chance (random answer)")):
        shares = results.baselines.get(name) or {}
        if shares and all(t in shares for t in results.tasks):
            record = {"label": label, "method": name, "variant": "", "granularity": 0, "n_seeds": 0,
                      **{t: shares[t] * 100 for t in results.tasks}}
            record["suite_mean"] = sum(shares[t] for t in results.tasks) / len(results.tasks) * 100
            record["note"] = {
                "majority": "always the test set's most common label, per task",
                "chance": "a uniformly random choice: the mean of 1/#choices",
            }[name]
            records.append(record)
    return pd.DataFrame.from_records(records)


def below_chance(table: pd.DataFrame, tasks: list[str]) -> set[tuple[int, str]]:
    """``(row index, task)`` cells of trained runs (and the base model) that score below the
    chance row of the table."""
    chance = table[table["method"] == "chance"]
    if chance.empty:
        return set()
    level = chance.iloc[0]
    return {
        (i, t)
        for i, row in table.iterrows()
        if row["method"] not in ("chance", "majority")
        for t in tasks
        if not pd.isna(row[t]) and row[t] < level[t] - 1e-9
    }


def _main_display(table: pd.DataFrame, tasks: list[str], bold, results: StudyResults | None = None) -> pd.DataFrame:
    """The main table as strings, best cells wrapped by ``bold``."""
    scored = table[~table["method"].isin(["chance", "majority"])]
    best = best_cells(scored, [*tasks, "suite_mean"])
    low = below_chance(table, tasks)
    shown = pd.DataFrame(index=table.index)
    shown["method"] = table["label"]
    shown["seeds"] = table["n_seeds"].map(lambda v: "" if not v else str(int(v)))
    if "effective_experts" in table and table["effective_experts"].notna().any():
        shown["eff. experts"] = table["effective_experts"].map(lambda v: "" if pd.isna(v) else f"{v:.1f}")
    for task in tasks:
        shown[task] = [
            (bold(fmt_acc(v)) if i in best[task] else fmt_acc(v)) + (" ‡" if (i, task) in low else "")
            for i, v in table[task].items()
        ]
    suite = []
    for i, (m, s) in enumerate(zip(table["suite_mean"], table["suite_std"].reindex(table.index))):
        text = fmt_acc(m) + ("" if pd.isna(s) else f" ± {s:.{ACC_DECIMALS}f}")
        suite.append(bold(text) if table.index[i] in best["suite_mean"] else text)
    shown["suite mean ± std"] = suite
    for col in [c for c in table if c.startswith("suite:")]:
        declared = metric(col.removeprefix("suite:"))
        arrow = {True: " ↑", False: " ↓"}.get(declared.higher_is_better, "")
        shown[f"suite {declared.label}{arrow}"] = table[col].map(
            lambda v, m=declared: "" if pd.isna(v) else f"{v:.{m.decimals}f}"
        )
    for col in [c for c in table if c.startswith("extra:") and results is not None]:
        declared = extra_declaration(results, col)
        arrow = {True: " ↑", False: " ↓"}.get(declared.higher_is_better, "")
        shown[f"{declared.label}{arrow}"] = table[col].map(
            lambda v, m=declared: "" if pd.isna(v) else f"{v:.{m.decimals}f}"
        )
    for col in [c for c in table if c.startswith("metric:")]:
        declared = metric(col.removeprefix("metric:"))
        shown[declared.label] = table[col].map(
            lambda v, m=declared: "" if pd.isna(v) else f"{v:.{m.decimals}f}"
        )
    for col in ("total", "activated", "router"):
        shown[col] = table[col].map(fmt_int)
    shown["accounting"] = table["router_mode"].map(lambda v: "" if pd.isna(v) else f"router: {v}")
    shown["train (s)"] = table["train_s"].map(fmt_seconds)
    for col, (head, fmt) in MAIN_COST_SHOWN.items():
        if col in table and table[col].notna().any():
            shown[head] = table[col].map(lambda v, f=fmt: "–" if pd.isna(v) else f(v))
    shown["note"] = table["note"]
    return shown


def _main_caption(plan: StudyPlan, table: pd.DataFrame, cache_build_s: float = 0.0) -> str:
    budget = plan.config["budget"]
    seeds = plan.config["train"]["seeds"]
    missing = [which for which in ("R", "K") if reference_key(plan, which) is None]
    note = (
        f" No reference at rank {' or '.join(missing)} in this study (add the reference "
        "method, peft's LoRA, to methods)."
        if missing
        else ""
    )
    return (
        f"Study {plan.config['study']}: accuracy (%) per task and on the suite, mean over "
        f"{len(seeds)} seed(s); suite: mean ± sample std over seeds. Budget R = "
        f"{budget['total_rank']}, K = {budget['active_rank']}, router: {budget['router']}. "
        "Bold: best in column (baseline rows aside). ‡: below chance. Each task is scored by its "
        "primary metric (acc, or acc_norm when its choices are phrases)."
        + (" Eff. experts: exp(entropy) of the expert distribution of the evaluation's scored "
           "sequences, averaged over the adapted modules (G when every expert is used alike)."
           if "effective_experts" in table and table["effective_experts"].notna().any() else "")
        + note
        + (" Computed from the runs' stored samples (samples.json), for the runs that stored them: "
           + "; ".join(f"{metric(c.removeprefix('suite:')).label}" for c in table if c.startswith("suite:")
                       and c.removeprefix("suite:") in sample_metrics()) + "."
           if any(c.startswith("suite:") and c.removeprefix("suite:") in sample_metrics() for c in table) else "")
        + (" Columns named after a registry task of eval.tasks (" + ", ".join(sorted({c.split(":")[1] for c in table
           if c.startswith("extra:")})) + "): its metrics as lm-eval reports them (per filter; mean over seeds, "
           "a share in %), not part of the suite mean; their intervals are in significance_metrics.md."
           if any(c.startswith("extra:") for c in table) else "")
        + (" Forgetting: the general text's word perplexity (lm-eval's loglikelihood_rolling on "
           "eval.general_text) relative to the untrained model's, in %; its intervals are in "
           "forgetting.md." if "forgetting" in table and table["forgetting"].notna().any() else "")
        + (" Cost, measured while training (mean over seeds): tokens/s of the training loop; "
           "peak RSS: the training process's peak resident memory (interpreter, libraries, base "
           "model and lower-layer cache included; cost.md sets it beside the estimate); "
           "adapter: the saved adapter file." if "cost:tokens_per_s" in table else "")
        + (
            f" Training times exclude the frozen lower-layer cache: its one-time build "
            f"({cache_build_s:.0f} s in all, shared by every run), a wait for it and its loading."
            if cache_build_s
            else ""
        )
    )


def lm_eval_metrics_table(results: StudyResults) -> pd.DataFrame:
    """lm-eval's accuracies per task (every registered task metric that is a share: ``acc``,
    ``acc_norm``), mean over seeds (%), one row per method x variant (the main table shows
    each task's primary metric only)."""
    runs = results.runs
    records = []
    for key in results.keys:
        group = runs[runs["key"] == key]
        if group.empty:
            continue
        first = group.iloc[0]
        record = {"method": row_label(results.plan, first["method"], first["variant"])}
        for task in results.tasks:
            for declared in task_metrics():
                if declared.unit != "share":
                    continue
                col = f"lm:{declared.name}:{task}"
                values = group[col].astype(float) if col in group else pd.Series(dtype=float)
                if declared.name in GENERATION_METRICS and not values.notna().any():
                    continue  # a generation metric of a multiple-choice task
                record[f"{task} {declared.name}"] = (
                    values.mean() * declared.scale if values.notna().any() else math.nan
                )
        records.append(record)
    return pd.DataFrame.from_records(records)


def main_table_texts(results: StudyResults, table: pd.DataFrame | None = None) -> dict[str, str]:
    """``{"csv", "md", "tex"}`` of the main table (task columns headed with their primary
    metric), the Markdown followed by lm-eval's acc and acc_norm per task."""
    table = main_table(results) if table is None else table
    caption = _main_caption(results.plan, table, results.cache_build_s)
    primary = primary_metrics(results)
    headers = {t: f"{t} ({primary.get(t, 'acc')})" for t in results.tasks}
    md = _main_display(table, results.tasks, md_bold, results).rename(columns=headers)
    tex = _main_display(table, results.tasks, lambda s: "\x00" + s + "\x01", results).rename(columns=headers)
    tex = tex.map(lambda s: tex_escape(s).replace("\x00", r"\textbf{").replace("\x01", "}"))
    both = lm_eval_metrics_table(results)
    both_md = ""
    if not both.empty and both.drop(columns="method").notna().any().any():
        shown = both.copy()
        for col in shown.columns[1:]:
            shown[col] = shown[col].map(lambda v: "–" if pd.isna(v) else fmt_acc(v))
        both_md = (
            "\n\nlm-eval's `acc` and `acc_norm` per task (%, mean over seeds), as its own results "
            "report them; the table above shows each task's primary metric.\n\n"
            + shown.to_markdown(index=False, disable_numparse=True)
        )
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + md.to_markdown(index=False) + both_md + "\n",
        "tex": to_latex(tex, caption, "tab:main", escaped=True),
    }


# -- significance and the granularity trend (harness.analysis.comparisons) ----------------------------


def significance_texts(plan: StudyPlan, table: pd.DataFrame, family: str = "methods") -> dict[str, str]:
    caption = significance_caption(plan, table, family)
    shown = significance_display(table)
    md = shown.to_markdown(index=False) if not shown.empty else "(no comparison: the study has no base run)"
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + md + "\n",
        "tex": to_latex(shown, caption, f"tab:{'training_gain' if family == 'training' else 'significance'}")
        if not shown.empty else "% no comparison\n",
    }


def trend_texts(plan: StudyPlan, table: pd.DataFrame) -> dict[str, str]:
    caption = trend_caption(plan)
    shown = trend_display(table)
    md = shown.to_markdown(index=False) if not shown.empty else "(no method was run at two or more granularities)"
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + md + "\n",
        "tex": to_latex(shown, caption, "tab:trend") if not shown.empty else "% no trend\n",
    }


def sharing_texts(plan: StudyPlan, table: pd.DataFrame) -> dict[str, str]:
    caption = (
        f"Study {plan.config['study']}: expert overlap of two tasks (histogram intersection of "
        "their expert distributions at evaluation; 1 = the same experts in the same shares), "
        "mean over adapted modules and task pairs, then over seeds: within a task family, "
        "across families, over all pairs (harness/analysis/sharing.py)."
    )
    shown = pd.DataFrame(
        {
            "method": [row_label(plan, m, v) for m, v in zip(table["method"], table["variant"])],
            "seeds": table["n_seeds"].astype(str),
            "within family": table["within"].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}"),
            "across families": table["across"].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}"),
            "within − across": table["within_minus_across"].map(lambda v: "–" if pd.isna(v) else f"{v:+.3f}"),
            "all pairs": table["all_pairs"].map(lambda v: f"{v:.3f}"),
        }
    )
    return {"csv": table.to_csv(index=False), "md": caption + "\n\n" + shown.to_markdown(index=False) + "\n"}


# -- provenance ------------------------------------------------------------------------------


def provenance_table(results: StudyResults) -> pd.DataFrame:
    """Per run: when, where and with what code and packages its results were produced."""
    records = []
    for run in results.plan.runs:
        metrics = results.metrics[run.run_id]
        train = results.train.get(run.run_id, {})
        source = train.get("provenance") or metrics.get("provenance") or {}
        versions = source.get("versions") or {}
        git = source.get("git") or {}
        hw = source.get("hardware") or {}
        commit = git.get("commit")
        records.append(
            {
                "run_id": run.run_id,
                "seed": run.seed,
                "trained_utc": (train.get("provenance") or {}).get("time_utc"),
                "evaluated_utc": (metrics.get("provenance") or {}).get("time_utc"),
                "git_commit": commit[:12] if commit else None,
                "git_dirty": git.get("dirty"),
                # the engine modules it trained under vs this checkout's (harness.plan.status)
                "engine_code": engine_code(train),
                "device": train.get("device", "cpu" if not hw.get("cuda") else "cuda"),
                "hardware": hw.get("gpu") or hw.get("cpu"),
                **{pkg: versions.get(pkg) for pkg in ("python", "torch", "transformers", "peft")},
                "lm_eval": metrics.get("lm_eval_version") or versions.get("lm_eval"),
                "train_s": (train.get("timing") or {}).get("wall_s"),
                "eval_s": (metrics.get("timing") or {}).get("wall_s"),
            }
        )
    return pd.DataFrame.from_records(records)


# -- builders (one per table of the outputs registry, harness.analysis.outputs) -------------


@table_builder("main_table")
def build_main_table(results: StudyResults) -> dict[str, str]:
    return main_table_texts(results)


@table_builder("budget_table")
def build_budget_table(results: StudyResults) -> dict[str, str]:
    return budget_table_texts(results.plan, budget_frame(results.plan))


@table_builder("significance")
def build_significance(results: StudyResults) -> dict[str, str]:
    return significance_texts(results.plan, significance_table(results))


@table_builder("significance_metrics")
def build_significance_metrics(results: StudyResults) -> dict[str, str]:
    table = metrics_significance_table(results)
    caption = metrics_significance_caption(results, table)
    if table.empty:
        return {"csv": table.to_csv(index=False),
                "md": caption + "\n\n(no metric beside the suite score has per-item values in this study)\n",
                "tex": "% no other metric\n"}
    shown = metrics_significance_display(table)
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + shown.to_markdown(index=False, disable_numparse=True) + "\n",
        "tex": to_latex(shown, caption, "tab:significance_metrics"),
    }


@table_builder("training_gain")
def build_training_gain(results: StudyResults) -> dict[str, str]:
    return significance_texts(results.plan, significance_table(results, "training"), "training")


@table_builder("granularity_trend")
def build_granularity_trend(results: StudyResults) -> dict[str, str]:
    return trend_texts(results.plan, trend_table(results))


@table_builder("power")
def build_power(results: StudyResults) -> dict[str, str]:
    return power_texts(results.plan, power_table(results))


@table_builder("expert_sharing")
def build_expert_sharing(results: StudyResults) -> dict[str, str]:
    sharing = sharing_table(results)
    if sharing.empty:
        return {"csv": "", "md": "No routed run recorded its experts.\n"}
    return sharing_texts(results.plan, sharing)


@table_builder("forgetting")
def build_forgetting(results: StudyResults) -> dict[str, str]:
    table = forgetting_table(results)
    if table["diff"].isna().all():
        text = "No run scored a general text (set eval.general_text).\n"
        return {"csv": table.to_csv(index=False), "md": text, "tex": "% no general text\n"}
    caption = forgetting_caption(results.plan, table)
    shown = forgetting_display(table)
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + shown.to_markdown(index=False) + "\n",
        "tex": to_latex(shown, caption, "tab:forgetting"),
    }


def cost_table(results: StudyResults) -> pd.DataFrame:
    """Per method x variant, mean over seeds: the suite score (%), training wall time (s),
    tokens per second of the training loop, the measured peak memory (process RSS; on CUDA
    ``max_memory_allocated``), :mod:`harness.plan.memory`'s estimate of the allocated
    memory, the adapter file's size (KiB) and the evaluation wall time (s)."""
    runs = results.runs
    records = []
    for key in results.keys:
        group = runs[runs["key"] == key]
        if group.empty or group.iloc[0]["method"] == "base":
            continue
        first = group.iloc[0]

        def mean(col: str, group: pd.DataFrame = group) -> float:
            return group[col].astype(float).mean() if col in group else math.nan

        measured_cuda = mean("cost:cuda_max_allocated_mib")
        estimate = mean("cost:estimated_allocated_mib")
        records.append({
            "label": row_label(results.plan, first["method"], first["variant"]),
            "method": first["method"], "variant": first["variant"], "n_seeds": len(group),
            "suite_mean": group["suite_acc"].astype(float).mean() * 100,
            "train_s": mean("train_s"),
            "tokens_per_s": mean("cost:tokens_per_s"),
            "peak_rss_mib": mean("cost:peak_rss_mib"),
            "cuda_max_allocated_mib": measured_cuda,
            "estimated_allocated_mib": estimate,
            "cuda_vs_estimate": measured_cuda / estimate if estimate and not math.isnan(measured_cuda) else math.nan,
            "adapter_kib": mean("cost:adapter_bytes") / 1024,
            "eval_s": mean("eval_s"),
        })
    return pd.DataFrame.from_records(records)


@table_builder("cost")
def build_cost(results: StudyResults) -> dict[str, str]:
    table = cost_table(results)
    plan = results.plan
    caption = (
        f"Study {plan.config['study']}: what each run cost, measured while it trained (mean over "
        "seeds): wall time without the shared lower-layer cache, tokens per second of the "
        "training loop (prompt and answer tokens, no padding), the training process's peak "
        "resident memory (RSS: interpreter, libraries, the base model and the lower-layer cache "
        "included), on CUDA torch's max_memory_allocated and its ratio to harness/plan/memory.py's "
        "estimate of the allocated memory of one step, the saved adapter's size and the "
        "evaluation's wall time. On the CPU the estimate (tensors only) is far below the RSS."
    )
    if table.empty or table["tokens_per_s"].isna().all():
        return {"csv": table.to_csv(index=False),
                "md": caption + "\n\nNo run of this study recorded its cost (train.json has no 'cost').\n",
                "tex": "% no cost recorded\n"}
    fmt = {
        "suite_mean": "{:.1f}", "train_s": "{:.1f}", "tokens_per_s": "{:,.0f}", "peak_rss_mib": "{:,.0f}",
        "cuda_max_allocated_mib": "{:,.0f}", "estimated_allocated_mib": "{:,.0f}",
        "cuda_vs_estimate": "{:.2f}", "adapter_kib": "{:,.0f}", "eval_s": "{:.1f}",
    }
    shown = pd.DataFrame({"method": table["label"], "seeds": table["n_seeds"].astype(str)})
    heads = {
        "suite_mean": "suite (%)", "train_s": "train (s)", "tokens_per_s": "tokens/s",
        "peak_rss_mib": "peak RSS (MiB)", "cuda_max_allocated_mib": "peak CUDA (MiB)",
        "estimated_allocated_mib": "estimate (MiB)", "cuda_vs_estimate": "CUDA / estimate",
        "adapter_kib": "adapter (KiB)", "eval_s": "eval (s)",
    }
    for col, head in heads.items():
        if table[col].notna().any():
            shown[head] = table[col].map(lambda v, f=fmt[col]: "–" if pd.isna(v) else f.format(v))
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + shown.to_markdown(index=False) + "\n",
        "tex": to_latex(shown, caption, "tab:cost"),
    }


def tuning_table(results: StudyResults) -> pd.DataFrame:
    """Per tuned method x variant: its validation suite score (%) at every rate of the grid
    (mean over the tuning seeds), the chosen rate, and its test suite score at that rate
    (the final runs, mean over the reported seeds). Empty without a tune stage."""
    plan = results.plan
    if not plan.tuning:
        return pd.DataFrame()
    rates = read_json(plan.rates_path) if plan.rates_path.exists() else {"rates": {}}
    lrs = plan.config["tune"]["lrs"]
    records = []
    for key in results.keys:
        method, _, tag = key.partition("-")
        runs = [r for r in plan.tuning if r.method == method and r.tag == tag]
        if not runs:
            continue
        record = {"label": row_label(plan, method, tag), "method": method, "variant": tag}
        for lr in lrs:
            values = [
                read_json(plan.run_dir(r) / "metrics.json")["suite_acc"] * 100
                for r in runs if r.settings.lr == lr and (plan.run_dir(r) / "metrics.json").exists()
            ]
            record[f"lr {lr:g}"] = sum(values) / len(values) if values else math.nan
        chosen = (rates["rates"].get(key) or {}).get("lr")
        record["chosen_lr"] = chosen
        group = results.runs[results.runs["key"] == key]
        record["test_suite_mean"] = group["suite_acc"].astype(float).mean() * 100
        records.append(record)
    return pd.DataFrame.from_records(records)


@table_builder("tuning")
def build_tuning(results: StudyResults) -> dict[str, str]:
    table = tuning_table(results)
    plan = results.plan
    if table.empty:
        return {"csv": "", "md": f"Study {plan.config['study']} has no tune stage: every run trains "
                f"at train.lr = {plan.config['train']['lr']:g} (or its method's own rate).\n",
                "tex": "% no tune stage\n"}
    tune = plan.config["tune"]
    not_tuned = sorted({r.method for r in plan.trained_runs if not r.tuned})
    caption = (
        f"Study {plan.config['study']}: the tune stage. Each method x variant trained at every rate "
        f"of the grid ({', '.join(f'{lr:g}' for lr in tune['lrs'])}) on the training items minus "
        f"a validation split ({tune['validation_fraction']:.0%} of each task's items per label, "
        f"seed {tune['seed']}), tuning seed(s) {', '.join(map(str, tune['seeds']))} (not the "
        "reported ones), and scored by lm-eval on that split: validation suite score (%), mean "
        "over tuning seeds. Chosen: the best mean (a tie goes to the smaller rate); bold. Test: "
        "the final runs at the chosen rate (mean over the reported seeds), trained on every "
        "training item."
        + (f" Not tuned: {', '.join(not_tuned)} (built on components trained on the whole "
           "training split, or not in tune.methods; their configured rate)." if not_tuned else "")
    )
    shown = pd.DataFrame({"method": table["label"]})
    for lr in tune["lrs"]:
        col = f"lr {lr:g}"
        shown[col] = [
            "–" if pd.isna(v) else (md_bold(f"{v:.1f}") if chosen == lr else f"{v:.1f}")
            for v, chosen in zip(table[col], table["chosen_lr"])
        ]
    shown["chosen rate"] = table["chosen_lr"].map(lambda v: "–" if v is None or pd.isna(v) else f"{v:g}")
    shown["test suite (%)"] = table["test_suite_mean"].map(fmt_acc)
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + shown.to_markdown(index=False) + "\n",
        "tex": to_latex(shown.map(lambda v: str(v).replace("**", "")), caption, "tab:tuning"),
    }


@table_builder("provenance")
def build_provenance(results: StudyResults) -> dict[str, str]:
    prov = provenance_table(results)
    return {
        "csv": prov.to_csv(index=False),
        "md": prov.astype(object).where(prov.notna(), "–").to_markdown(index=False) + "\n",
    }


# -- writing ---------------------------------------------------------------------------------


def write_tables(
    plan: StudyPlan, out_dir: Path | str | None = None, verify: bool = True
) -> list[Path]:
    """Collect the stored results and write every table of the outputs registry (each in its
    file kinds, atomically, under ``{out_dir}/tables/``) and its report caption; returns the
    paths written."""
    out = Path(out_dir or plan.out_dir)
    mixed = engine_mix(plan)
    if mixed:
        raise ValueError(mixed)
    results = collect_results(plan)
    if verify:
        verified_budget(plan)
    written = []
    for entry in outputs("table"):
        texts = entry.build()(results)
        missing = set(entry.formats) - set(texts)
        if missing:
            raise ValueError(f"table {entry.name!r}: its builder gave no {sorted(missing)} text")
        for path in entry.paths(out):
            path = Path(path)
            atomic_write_text(path, texts[path.suffix[1:]])
            written.append(path)
        written.append(write_caption(entry, out))
    return written
