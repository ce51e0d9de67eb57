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

* ``significance``: paired comparisons over seeds (the same seed means the
  same data order and the same initialisation seed). For rows A and B and the
  seeds both ran, ``d_s = a_s(A) - a_s(B)`` in percentage points; reported:
  ``n`` pairs, ``mean_diff = (1/n) sum_s d_s``, ``std_diff`` (sample std of
  ``d_s``, ddof = 1), ``se = std_diff / sqrt(n)``, the paired t statistic
  ``t = mean_diff / se`` with ``n - 1`` degrees of freedom and its two-sided
  p-value (``scipy.stats.ttest_rel``; NaN when ``n < 2``). The verdict is
  "within noise" when ``|mean_diff| < 2 se`` or ``p >= 0.05``. Comparisons:
  every method x variant against LoRA rank R, and, for each method run at
  several granularities, the finest against the coarsest.

* ``provenance``: per run, the commit, package versions, device and wall times
  recorded with the results.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

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
    base_key,
    collect_results,
    reference_key,
    row_label,
    variant_key,
)

if TYPE_CHECKING:
    from harness.study import StudyPlan

#: verdict threshold on the paired t-test
ALPHA = 0.05


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
    return pd.DataFrame.from_records(records)


def _main_display(table: pd.DataFrame, tasks: list[str], bold) -> pd.DataFrame:
    """The main table as strings, best cells wrapped by ``bold``."""
    best = best_cells(table, [*tasks, "suite_mean"])
    shown = pd.DataFrame(index=table.index)
    shown["method"] = table["label"]
    shown["seeds"] = table["n_seeds"].astype(str)
    for task in tasks:
        shown[task] = [
            bold(fmt_acc(v)) if i in best[task] else fmt_acc(v) for i, v in table[task].items()
        ]
    suite = []
    for i, (m, s) in enumerate(zip(table["suite_mean"], table["suite_std"])):
        text = fmt_acc(m) + ("" if pd.isna(s) else f" ± {s:.{ACC_DECIMALS}f}")
        suite.append(bold(text) if table.index[i] in best["suite_mean"] else text)
    shown["suite mean ± std"] = suite
    for col in [c for c in table if c.startswith("metric:")]:
        shown[col.removeprefix("metric:").replace("_", " ")] = table[col].map(
            lambda v: "" if pd.isna(v) else fmt_acc(v)
        )
    for col in ("total", "activated", "router"):
        shown[col] = table[col].map(fmt_int)
    shown["accounting"] = "router: " + table["router_mode"].astype(str)
    shown["train (s)"] = table["train_s"].map(fmt_seconds)
    shown["note"] = table["note"]
    return shown


def _main_caption(plan: StudyPlan, table: pd.DataFrame) -> str:
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
        "Bold: best in column." + note
    )


def main_table_texts(results: StudyResults, table: pd.DataFrame | None = None) -> dict[str, str]:
    """``{"csv", "md", "tex"}`` of the main table."""
    table = main_table(results) if table is None else table
    caption = _main_caption(results.plan, table)
    md = _main_display(table, results.tasks, md_bold)
    tex = _main_display(table, results.tasks, lambda s: "\x00" + s + "\x01")
    tex = tex.map(lambda s: tex_escape(s).replace("\x00", r"\textbf{").replace("\x01", "}"))
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + md.to_markdown(index=False) + "\n",
        "tex": to_latex(tex, caption, "tab:main", escaped=True),
    }


# -- significance --------------------------------------------------------------------------


def paired_difference(a: pd.Series, b: pd.Series) -> dict[str, Any]:
    """Paired comparison of two per-seed series (indexed by seed), ``d = a - b`` on the
    seeds both have. Returns ``n, mean_diff, std_diff (ddof=1), se, t, p_value, verdict``
    (see the module docstring for the formulas)."""
    from scipy.stats import ttest_rel

    seeds = sorted(set(a.index) & set(b.index))
    x = np.asarray([a[s] for s in seeds], dtype=float)
    y = np.asarray([b[s] for s in seeds], dtype=float)
    d = x - y
    n = len(d)
    out: dict[str, Any] = {"n_pairs": n, "seeds": " ".join(map(str, seeds))}
    mean = float(d.mean()) if n else math.nan
    std = float(d.std(ddof=1)) if n > 1 else math.nan
    se = std / math.sqrt(n) if n > 1 else math.nan
    if n == 0:
        t = p = math.nan
        verdict = "no common seeds"
    elif n < 2:
        t = p = math.nan
        verdict = "one seed: no noise estimate"
    elif std <= 1e-12 * max(1.0, abs(mean)):
        # every seed moved by the same amount; the t statistic is undefined (0/0 or x/0)
        t, p = (math.nan, math.nan) if mean == 0 else (math.copysign(math.inf, mean), 0.0)
        verdict = (
            "identical on every seed"
            if mean == 0
            else (("better" if mean > 0 else "worse") + " on every seed by the same amount")
        )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = ttest_rel(x, y)
        t, p = float(res.statistic), float(res.pvalue)
        if abs(mean) < 2 * se or p >= ALPHA:
            verdict = "within noise"
        else:
            verdict = "better" if mean > 0 else "worse"
    out.update(
        {"mean_diff": mean, "std_diff": std, "se": se, "t": t, "p_value": p, "verdict": verdict}
    )
    return out


def _per_seed(runs: pd.DataFrame, key: str) -> pd.Series:
    group = runs[runs["key"] == key]
    return pd.Series((group["suite_acc"].astype(float) * 100).values, index=group["seed"].values)


def significance_table(results: StudyResults) -> pd.DataFrame:
    """Paired differences of the suite score (percentage points), one row per comparison:
    every method x variant against LoRA rank R, then, per method with several granularities,
    its finest granularity against its coarsest. Columns: ``comparison, label, versus,
    method, variant, n_pairs, seeds, mean_diff, std_diff, se, t, p_value, verdict``."""
    plan = results.plan
    runs = results.runs
    ref = reference_key(plan, "R")
    ref_label = row_label(plan, *ref.split("-", 1)) if ref else ""
    ref_scores = _per_seed(runs, ref) if ref else pd.Series(dtype=float)
    records = []
    base = base_key(plan)
    for key in results.keys:
        if key in (ref, base) or ref_scores.empty:  # no reference at rank R: no such rows
            continue
        group = runs[runs["key"] == key]
        first = group.iloc[0]
        res = paired_difference(_per_seed(runs, key), ref_scores)
        records.append(
            {
                "comparison": "vs LoRA rank R",
                "label": row_label(plan, first["method"], first["variant"]),
                "versus": ref_label,
                "method": first["method"],
                "variant": first["variant"],
                **res,
            }
        )
    swept: dict[str, list[tuple[int, str]]] = {}
    for row in plan.rows:
        if not row.reference_method:
            swept.setdefault(row.method, []).append((row.variant.granularity, row.variant.tag))
    for method, variants in swept.items():
        if len({g for g, _ in variants}) < 2:
            continue
        coarse, fine = min(variants), max(variants)
        res = paired_difference(
            _per_seed(runs, variant_key(method, fine[1])),
            _per_seed(runs, variant_key(method, coarse[1])),
        )
        records.append(
            {
                "comparison": "finest vs coarsest G",
                "label": row_label(plan, method, fine[1]),
                "versus": row_label(plan, method, coarse[1]),
                "method": method,
                "variant": fine[1],
                **res,
            }
        )
    columns = ["comparison", "label", "versus", "method", "variant", "n_pairs", "seeds"]
    columns += ["mean_diff", "std_diff", "se", "t", "p_value", "verdict"]
    return pd.DataFrame.from_records(records, columns=columns)


def _verdict_words(row: pd.Series) -> str:
    v = row["verdict"]
    if v in ("better", "worse"):
        return f"{v} than {row['versus']}"
    return v


def significance_texts(plan: StudyPlan, table: pd.DataFrame) -> dict[str, str]:
    caption = (
        f"Study {plan.config['study']}: paired differences of the suite accuracy over seeds "
        "(same seed = same data order), in percentage points; std: sample std of the "
        "differences; se = std / sqrt(n); p: paired t-test; within noise when "
        f"|mean| < 2 se or p ≥ {ALPHA}."
    )
    shown = pd.DataFrame(
        {
            "comparison": table["comparison"],
            "method": table["label"],
            "versus": table["versus"],
            "pairs": table["n_pairs"].astype(str),
            "mean diff (pp)": table["mean_diff"].map(lambda v: "–" if pd.isna(v) else f"{v:+.2f}"),
            "std (pp)": table["std_diff"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}"),
            "se (pp)": table["se"].map(lambda v: "–" if pd.isna(v) else f"{v:.2f}"),
            "p": table["p_value"].map(lambda v: "–" if pd.isna(v) else f"{v:.3f}"),
            "verdict": table.apply(_verdict_words, axis=1) if len(table) else [],
        }
    )
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + shown.to_markdown(index=False) + "\n",
        "tex": to_latex(shown, caption, "tab:significance"),
    }


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
    }
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
