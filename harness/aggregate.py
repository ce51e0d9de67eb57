"""Tables regenerated from stored run results (pandas; CSV, Markdown and LaTeX).

The stored results come from the one reader, :func:`harness.results.collect_results`
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
    router's accuracy at picking the item's task adapter), mean over seeds, in percent
    when they are shares; blank for other methods and absent when no run reports them;
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
  p-value and the verdict (:mod:`harness.comparisons`, which states every formula).

* ``granularity_trend``: per method run at several granularities, its score at each G, the
  slope per doubling of G and the middle bump with their CIs, and the curve's shape.

* ``provenance``: per run, the commit, package versions, device and wall times
  recorded with the results.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from harness.comparisons import (
    power_table,
    power_texts,
    significance_caption,
    significance_display,
    significance_table,
    trend_caption,
    trend_display,
    trend_table,
)
from harness.io import atomic_write_text
from harness.render import (
    ACC_DECIMALS,
    best_cells,
    fmt_acc,
    fmt_int,
    fmt_seconds,
    md_bold,
    tex_escape,
    to_latex,
)
from harness.report import budget_frame, budget_table_texts, verified_budget
from harness.results import (
    StudyResults,
    collect_results,
    primary_metrics,
    reference_key,
    row_label,
    variant_key,
)
from harness.sharing import sharing_table

if TYPE_CHECKING:
    from harness.study import StudyPlan

# -- the main table ------------------------------------------------------------------------


def _metric_columns(runs: pd.DataFrame) -> list[str]:
    """The methods' scalar evaluation metrics that some run of the study reports."""
    return [c for c in runs if c.startswith("metric:") and runs[c].notna().any()]


def _notes(plan: StudyPlan) -> dict[str, str]:
    return {variant_key(r.method, r.variant.tag): r.as_dict()["note"] for r in plan.rows}


def main_table(results: StudyResults) -> pd.DataFrame:
    """One row per method x variant, in :attr:`StudyResults.keys` order.

    Columns: ``label, method, variant, granularity, n_seeds``, one column per task (mean
    accuracy over seeds, %), ``suite_mean`` and ``suite_std`` (%, sample std over seeds,
    ddof = 1), ``metric:<name>`` (%, a method's scalar evaluation metric such as a router's
    accuracy, mean over seeds; only when some run reports it, NaN for other methods), ``total,
    activated, router`` (parameters), ``router_mode``, ``train_s`` (mean training wall time
    over seeds, s; NaN for the base model) and ``note``.
    """
    plan = results.plan
    runs = results.runs
    notes = _notes(plan)
    mode = plan.config["budget"]["router"]
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
        for col in _metric_columns(runs):
            record[col] = group[col].astype(float).mean() * 100
        for col in ("total", "activated", "router"):
            record[col] = None if pd.isna(first[col]) else int(first[col])
        record["router_mode"] = mode
        record["train_s"] = group["train_s"].astype(float).mean()
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


def _main_display(table: pd.DataFrame, tasks: list[str], bold) -> pd.DataFrame:
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
    for col in [c for c in table if c.startswith("metric:")]:
        shown[col.removeprefix("metric:").replace("_", " ")] = table[col].map(
            lambda v: "" if pd.isna(v) else fmt_acc(v)
        )
    for col in ("total", "activated", "router"):
        shown[col] = table[col].map(fmt_int)
    shown["accounting"] = table["router_mode"].map(lambda v: "" if pd.isna(v) else f"router: {v}")
    shown["train (s)"] = table["train_s"].map(fmt_seconds)
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
        + (
            f" Training times exclude the frozen lower-layer cache: its one-time build "
            f"({cache_build_s:.0f} s in all, shared by every run), a wait for it and its loading."
            if cache_build_s
            else ""
        )
    )


def lm_eval_metrics_table(results: StudyResults) -> pd.DataFrame:
    """lm-eval's ``acc`` and ``acc_norm`` per task, mean over seeds (%), one row per method
    x variant (the main table shows each task's primary metric only)."""
    runs = results.runs
    records = []
    for key in results.keys:
        group = runs[runs["key"] == key]
        if group.empty:
            continue
        first = group.iloc[0]
        record = {"method": row_label(results.plan, first["method"], first["variant"])}
        for task in results.tasks:
            for metric in ("acc", "acc_norm"):
                col = f"lm:{metric}:{task}"
                values = group[col].astype(float) if col in group else pd.Series(dtype=float)
                record[f"{task} {metric}"] = values.mean() * 100 if values.notna().any() else math.nan
        records.append(record)
    return pd.DataFrame.from_records(records)


def main_table_texts(results: StudyResults, table: pd.DataFrame | None = None) -> dict[str, str]:
    """``{"csv", "md", "tex"}`` of the main table (task columns headed with their primary
    metric), the Markdown followed by lm-eval's acc and acc_norm per task."""
    table = main_table(results) if table is None else table
    caption = _main_caption(results.plan, table, results.cache_build_s)
    primary = primary_metrics(results)
    headers = {t: f"{t} ({primary.get(t, 'acc')})" for t in results.tasks}
    md = _main_display(table, results.tasks, md_bold).rename(columns=headers)
    tex = _main_display(table, results.tasks, lambda s: "\x00" + s + "\x01").rename(columns=headers)
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


# -- significance and the granularity trend (harness.comparisons) ----------------------------


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
        "across families, over all pairs (harness/sharing.py)."
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
                "device": train.get("device", "cpu" if not hw.get("cuda") else "cuda"),
                "hardware": hw.get("gpu") or hw.get("cpu"),
                **{pkg: versions.get(pkg) for pkg in ("python", "torch", "transformers", "peft")},
                "lm_eval": metrics.get("lm_eval_version") or versions.get("lm_eval"),
                "train_s": (train.get("timing") or {}).get("wall_s"),
                "eval_s": (metrics.get("timing") or {}).get("wall_s"),
            }
        )
    return pd.DataFrame.from_records(records)


# -- writing ---------------------------------------------------------------------------------


def write_tables(
    plan: StudyPlan, out_dir: Path | str | None = None, verify: bool = True
) -> list[Path]:
    """Collect the stored results and write every table (CSV, Markdown, LaTeX) atomically
    to ``{out_dir}/tables/``; returns the paths written."""
    out = Path(out_dir or plan.out_dir) / "tables"
    results = collect_results(plan)
    if verify:
        verified_budget(plan)
    texts = {
        "main_table": main_table_texts(results),
        "budget_table": budget_table_texts(plan, budget_frame(plan)),
        "significance": significance_texts(plan, significance_table(results)),
        "training_gain": significance_texts(plan, significance_table(results, "training"), "training"),
        "granularity_trend": trend_texts(plan, trend_table(results)),
        "power": power_texts(plan, power_table(results)),
    }
    sharing = sharing_table(results)
    if not sharing.empty:
        texts["expert_sharing"] = sharing_texts(plan, sharing)
    else:
        texts["expert_sharing"] = {"csv": "", "md": "No routed run recorded its experts.\n"}
    prov = provenance_table(results)
    texts["provenance"] = {
        "csv": prov.to_csv(index=False),
        "md": prov.astype(object).where(prov.notna(), "–").to_markdown(index=False) + "\n",
    }
    written = []
    for name, forms in texts.items():
        for ext, text in forms.items():
            path = out / f"{name}.{ext}"
            atomic_write_text(path, text)
            written.append(path)
    return written
