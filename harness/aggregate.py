"""Tables regenerated from stored run results (pandas; CSV, Markdown and LaTeX).

This module reads only what the runs left on disk — ``metrics.json``,
``train.json`` and ``train_log.jsonl`` in ``{out_dir}/runs/{run_id}/`` — plus
the study plan (budget rows, run ids); it never trains or evaluates anything.
Every run the plan lists must have its files: a missing file is reported by
run id and file name (:class:`MissingResultsError`), never silently dropped.

Tables, written to ``{out_dir}/tables/`` by :func:`write_tables`:

* ``main_table``: one row per method x variant (granularity ``G``, or LoRA
  rank), always with the LoRA references (rank R: same total; rank K: same
  activated) and the untrained base model. Accuracies are in percent. For a
  row with seeds ``s = 1..n`` and per-seed accuracies ``a_s``:

  - task and suite columns: the mean over seeds, ``mean = (1/n) sum_s a_s``;
  - ``suite_std``: the sample standard deviation over seeds,
    ``std = sqrt( sum_s (a_s - mean)^2 / (n - 1) )`` (``ddof = 1``; NaN when
    ``n = 1``), shown as ``mean ± std`` in Markdown and LaTeX;
  - ``router acc``: for methods that route to task adapters (MoA), the share of
    (adapted module, test prompt) pairs whose top-1 adapter is the prompt's task
    (``metrics.json``'s ``router_accuracy``), mean over seeds; blank for other methods
    and absent when no run of the study reports it;
  - parameters (total, activated, router) from ``train.json`` (what really
    trained), the accounting mode ``router: separate|counted``, and the mean
    training wall time over seeds (for a run built on parts trained by earlier jobs,
    MoA's task adapters, those jobs' wall times are included: both stages).

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

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harness.io import atomic_write_text, read_json
from harness.summary import MissingResultsError

if TYPE_CHECKING:
    from harness.study import StudyPlan

__all__ = [
    "DISPLAY_NAMES",
    "MissingResultsError",
    "StudyResults",
    "best_cells",
    "budget_table",
    "collect_results",
    "main_table",
    "paired_difference",
    "provenance_table",
    "row_label",
    "significance_table",
    "write_tables",
]

#: how method names are printed in tables and figures (plugins print their own name)
DISPLAY_NAMES = {
    "base": "base model",
    "lora": "LoRA",
    "multilora": "MultiLoRA",
    "molora": "MoLoRA",
    "sira": "SiRA",
    "smora": "SMoRA",
    "malora": "MALoRA",
    "moa": "MoA",
}

#: verdict threshold on the paired t-test
ALPHA = 0.05

#: decimals shown for accuracies (percent) in Markdown and LaTeX
ACC_DECIMALS = 1


# -- collecting stored results -------------------------------------------------------------


@dataclass
class StudyResults:
    """Everything the tables and figures need, read from disk.

    ``runs``: one row per run (``run_id, key, method, variant, granularity, seed,
    suite_acc, acc:<task>..., total, activated, router, train_s, eval_s, final_loss``),
    accuracies as fractions in [0, 1]. ``curves``: one row per logged training step
    (``run_id, key, method, variant, granularity, seed, step, loss``). ``loads``: the last
    logged expert load of each routed run, one row per (run, layer, expert)
    (``..., step, layer, expert, share, order``; ``order`` is the expert's position when
    that layer's shares are sorted from largest to smallest). ``curves`` and ``loads`` are
    empty unless the logs were read.
    """

    plan: StudyPlan
    runs: pd.DataFrame
    tasks: list[str]
    curves: pd.DataFrame
    loads: pd.DataFrame
    metrics: dict[str, dict[str, Any]]
    train: dict[str, dict[str, Any]]

    @property
    def keys(self) -> list[str]:
        """Method x variant keys in table order: base, LoRA rank R, LoRA rank K, then the
        rest in the order of the study's budget rows."""
        return variant_keys(self.plan)


def variant_key(method: str, variant: str) -> str:
    return f"{method}-{variant}"


def _reference_tags(plan: StudyPlan) -> tuple[str, str]:
    budget = plan.config["budget"]
    return f"r{budget['total_rank']}", f"r{budget['active_rank']}"


def reference_key(plan: StudyPlan, which: str = "R") -> str:
    """The key of LoRA rank R (``which="R"``, same total) or rank K (``"K"``, same activated)."""
    tag_r, tag_k = _reference_tags(plan)
    return variant_key("lora", tag_r if which == "R" else tag_k)


def base_key(plan: StudyPlan) -> str | None:
    base = [r for r in plan.runs if r.is_base]
    return variant_key("base", base[0].tag) if base else None


def variant_keys(plan: StudyPlan) -> list[str]:
    keys: list[str] = []
    if (b := base_key(plan)) is not None:
        keys.append(b)
    present = {variant_key(row.method, row.variant.tag) for row in plan.rows}
    for ref in (reference_key(plan, "R"), reference_key(plan, "K")):
        if ref in present and ref not in keys:
            keys.append(ref)
    for row in plan.rows:
        key = variant_key(row.method, row.variant.tag)
        if key not in keys:
            keys.append(key)
    return keys


def row_label(plan: StudyPlan, method: str, variant: str, granularity: int | None = None) -> str:
    """A reader's name for a method x variant: ``SiRA G=8``, ``LoRA r=16 (rank R)``."""
    name = DISPLAY_NAMES.get(method, method)
    if method == "base":
        return "base model (untrained)"
    tag_r, tag_k = _reference_tags(plan)
    if method == "lora" and variant in (tag_r, tag_k):
        role = "rank R" if variant == tag_r else "rank K"
        return f"{name} r={variant[1:]} ({role})"
    if variant.startswith("G") and variant[1:].isdigit():
        return f"{name} G={variant[1:]}"
    return f"{name} {variant}"


def _read_json_named(path: Path) -> dict[str, Any]:
    try:
        return read_json(path)
    except ValueError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None


def _read_log(path: Path) -> list[dict[str, Any]]:
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as exc:
            raise ValueError(f"{path}, line {number}: not valid JSON ({exc})") from None
    return records


def missing_results(plan: StudyPlan, logs: bool = False) -> list[tuple[str, str]]:
    """``(run_id, file name)`` for every stored result the plan expects and the disk lacks."""
    needed = ["metrics.json"]
    trained = ["train.json", *(["train_log.jsonl"] if logs else [])]
    missing = []
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        for name in needed + ([] if run.is_base else trained):
            if not (run_dir / name).exists():
                missing.append((run.run_id, name))
    return missing


def _raise_missing(plan: StudyPlan, missing: list[tuple[str, str]]) -> None:
    by_run: dict[str, list[str]] = {}
    for run_id, name in missing:
        by_run.setdefault(run_id, []).append(name)
    listed = "; ".join(f"{run_id}: {', '.join(names)}" for run_id, names in by_run.items())
    raise MissingResultsError(
        f"{len(by_run)} of {len(plan.runs)} run(s) of study {plan.config['study']!r} lack stored "
        f"results in {plan.out_dir / 'runs'} — {listed}. Tables and figures are built only from "
        "complete results: run the study (`snakemake --cores N --configfile <config>`) or copy "
        "the missing run folders in."
    )


def _suite_score(metrics: dict[str, Any]) -> float:
    suite = metrics.get("suite_acc")
    if suite is not None:
        return float(suite)
    accs = [v["acc"] for v in metrics.get("tasks", {}).values() if v.get("acc") is not None]
    return float(np.mean(accs)) if accs else math.nan


def stage_one_seconds(plan: StudyPlan, run) -> float:
    """Training wall time of the parts a run was built on (MoA's task adapters,
    ``Run.components``; 0 for other methods), summed; NaN if one has no ``train.json``."""
    total = 0.0
    for component in getattr(run, "components", None) or []:
        path = plan.out_dir / component / "train.json"
        if not path.exists():
            return math.nan
        total += (_read_json_named(path).get("timing") or {}).get("wall_s", math.nan)
    return total


def collect_results(plan: StudyPlan, logs: bool = False) -> StudyResults:
    """Read every run's stored results; raise :class:`MissingResultsError` naming every
    missing ``(run id, file)`` if any run of the plan is incomplete.

    ``logs=True`` also reads ``train_log.jsonl`` (training curves and expert loads).
    """
    missing = missing_results(plan, logs=logs)
    if missing:
        _raise_missing(plan, missing)
    rows, curves, loads = [], [], []
    all_metrics, all_train = {}, {}
    tasks: list[str] = []
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        metrics = _read_json_named(run_dir / "metrics.json")
        if metrics.get("run_id", run.run_id) != run.run_id:
            raise ValueError(
                f"{run_dir / 'metrics.json'} belongs to run {metrics.get('run_id')!r}, not "
                f"{run.run_id!r}: the folder was copied or renamed; rerun its evaluation"
            )
        all_metrics[run.run_id] = metrics
        for task in metrics.get("tasks", {}):
            if task not in tasks:
                tasks.append(task)
        ident = {
            "run_id": run.run_id,
            "key": variant_key(run.method, run.tag),
            "method": run.method,
            "variant": run.tag,
            "granularity": run.granularity,
            "seed": run.seed,
        }
        row: dict[str, Any] = {
            **ident,
            "suite_acc": _suite_score(metrics),
            "router_accuracy": metrics.get("router_accuracy", math.nan),
            **{f"acc:{t}": v.get("acc") for t, v in metrics.get("tasks", {}).items()},
            "total": 0,
            "activated": 0,
            "router": 0,
            "train_s": math.nan,
            "eval_s": (metrics.get("timing") or {}).get("wall_s", math.nan),
            "final_loss": math.nan,
        }
        if not run.is_base:
            train = _read_json_named(run_dir / "train.json")
            all_train[run.run_id] = train
            params = train.get("params") or {}
            row.update(
                {
                    "total": params.get("total"),
                    "activated": params.get("activated"),
                    "router": params.get("router"),
                    "train_s": (train.get("timing") or {}).get("wall_s", math.nan)
                    + stage_one_seconds(plan, run),
                    "final_loss": train.get("final_loss", math.nan),
                }
            )
            if logs:
                records = _read_log(run_dir / "train_log.jsonl")
                for rec in records:
                    curves.append({**ident, "step": rec["step"], "loss": rec.get("loss")})
                last = next((r for r in reversed(records) if r.get("expert_load")), None)
                if last is not None:
                    for layer, shares in last["expert_load"].items():
                        order = np.argsort(-np.asarray(shares, dtype=float), kind="stable")
                        position = np.empty(len(shares), dtype=int)
                        position[order] = np.arange(len(shares))
                        for expert, share in enumerate(shares):
                            loads.append(
                                {
                                    **ident,
                                    "step": last["step"],
                                    "layer": layer,
                                    "expert": expert,
                                    "share": float(share),
                                    "order": int(position[expert]),
                                }
                            )
        rows.append(row)
    runs = pd.DataFrame.from_records(rows)
    for col in ("total", "activated", "router"):
        runs[col] = pd.to_numeric(runs[col])
    curve_cols = ["run_id", "key", "method", "variant", "granularity", "seed", "step", "loss"]
    curves_df = pd.DataFrame.from_records(curves, columns=curve_cols)
    if len(curves_df):
        curves_df = curves_df.drop_duplicates(["run_id", "step"], keep="last")
    load_cols = [*curve_cols[:6], "step", "layer", "expert", "share", "order"]
    return StudyResults(
        plan=plan,
        runs=runs,
        tasks=tasks,
        curves=curves_df,
        loads=pd.DataFrame.from_records(loads, columns=load_cols),
        metrics=all_metrics,
        train=all_train,
    )


# -- the main table ------------------------------------------------------------------------


def _notes(plan: StudyPlan) -> dict[str, str]:
    return {variant_key(r.method, r.variant.tag): r.as_dict()["note"] for r in plan.rows}


def main_table(results: StudyResults) -> pd.DataFrame:
    """One row per method x variant, in :attr:`StudyResults.keys` order.

    Columns: ``label, method, variant, granularity, n_seeds``, one column per task (mean
    accuracy over seeds, %), ``suite_mean`` and ``suite_std`` (%, sample std over seeds,
    ddof = 1), ``router_acc`` (%, only when some run reports one: MoA's router accuracy at
    picking the item's task adapter, mean over seeds; NaN for other methods), ``total,
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
        if "router_accuracy" in runs and runs["router_accuracy"].notna().any():
            record["router_acc"] = group["router_accuracy"].astype(float).mean() * 100
        for col in ("total", "activated", "router"):
            record[col] = None if pd.isna(first[col]) else int(first[col])
        record["router_mode"] = mode
        record["train_s"] = group["train_s"].astype(float).mean()
        record["note"] = (
            "untrained: no adapter" if first["method"] == "base" else notes.get(key, "")
        )
        records.append(record)
    return pd.DataFrame.from_records(records)


def best_cells(
    frame: pd.DataFrame, columns: list[str], decimals: int = ACC_DECIMALS
) -> dict[str, set]:
    """For each column, the row indices holding its maximum at the displayed precision
    (ties all count); NaN never wins."""
    out: dict[str, set] = {}
    for col in columns:
        values = frame[col].astype(float).round(decimals)
        if values.notna().any():
            out[col] = set(values.index[values == values.max()])
        else:
            out[col] = set()
    return out


def _fmt_acc(v: float) -> str:
    return "–" if pd.isna(v) else f"{v:.{ACC_DECIMALS}f}"


def _fmt_int(v: Any) -> str:
    return "–" if pd.isna(v) else f"{int(v):,}"


def _fmt_seconds(v: float) -> str:
    return "–" if pd.isna(v) else f"{v:.1f}"


def _main_display(table: pd.DataFrame, tasks: list[str], bold) -> pd.DataFrame:
    """The main table as strings, best cells wrapped by ``bold``."""
    best = best_cells(table, [*tasks, "suite_mean"])
    shown = pd.DataFrame(index=table.index)
    shown["method"] = table["label"]
    shown["seeds"] = table["n_seeds"].astype(str)
    for task in tasks:
        shown[task] = [
            bold(_fmt_acc(v)) if i in best[task] else _fmt_acc(v) for i, v in table[task].items()
        ]
    suite = []
    for i, (m, s) in enumerate(zip(table["suite_mean"], table["suite_std"])):
        text = _fmt_acc(m) + ("" if pd.isna(s) else f" ± {s:.{ACC_DECIMALS}f}")
        suite.append(bold(text) if table.index[i] in best["suite_mean"] else text)
    shown["suite mean ± std"] = suite
    if "router_acc" in table:
        shown["router acc"] = table["router_acc"].map(lambda v: "" if pd.isna(v) else _fmt_acc(v))
    for col in ("total", "activated", "router"):
        shown[col] = table[col].map(_fmt_int)
    shown["accounting"] = "router: " + table["router_mode"].astype(str)
    shown["train (s)"] = table["train_s"].map(_fmt_seconds)
    shown["note"] = table["note"]
    return shown


def _md_bold(text: str) -> str:
    return f"**{text}**"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "×": r"$\times$",
    "−": "--",
}


def tex_escape(text: Any) -> str:
    """Escape LaTeX's special characters (underscores included) in one cell or header."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


#: columns set flush left in LaTeX (the rest, numbers, flush right)
_TEXT_COLUMNS = {
    "method",
    "variant",
    "run",
    "extra",
    "note",
    "router_mode",
    "accounting",
    "comparison",
    "versus",
    "verdict",
    "suite mean ± std",
}


def _to_latex(shown: pd.DataFrame, caption: str, label: str, escaped: bool = False) -> str:
    frame = shown.copy()
    if not escaped:
        frame = frame.map(tex_escape)
    frame.columns = [tex_escape(c) for c in frame.columns]
    return frame.to_latex(
        index=False,
        escape=False,
        caption=tex_escape(caption),
        label=label,
        column_format="".join(
            "l" if i == 0 or str(c) in _TEXT_COLUMNS else "r" for i, c in enumerate(shown.columns)
        ),
    )


def _main_caption(plan: StudyPlan, table: pd.DataFrame) -> str:
    budget = plan.config["budget"]
    seeds = plan.config["train"]["seeds"]
    missing = [
        which
        for which in ("R", "K")
        if reference_key(plan, which) not in set(table["method"] + "-" + table["variant"])
    ]
    note = (
        f" No LoRA reference at rank {' or '.join(missing)} in this study (add lora to methods)."
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
    md = _main_display(table, results.tasks, _md_bold)
    tex = _main_display(table, results.tasks, lambda s: "\x00" + s + "\x01")
    tex = tex.map(lambda s: tex_escape(s).replace("\x00", r"\textbf{").replace("\x01", "}"))
    return {
        "csv": table.to_csv(index=False),
        "md": caption + "\n\n" + md.to_markdown(index=False) + "\n",
        "tex": _to_latex(tex, caption, "tab:main", escaped=True),
    }


# -- the budget table -----------------------------------------------------------------------


def budget_table(plan: StudyPlan, verify: bool = True) -> pd.DataFrame:
    """The solver's rows (``harness.report.budget_frame``); with ``verify`` the counts are
    checked against real adapter layers built on the ``meta`` device (no weights)."""
    from harness.report import budget_frame

    if verify:
        from harness.budget import verify_counts
        from harness.study import load_methods

        verify_counts(plan.rows, {m.name: m for m, _ in load_methods(plan.config)}, plan.shapes)
    return budget_frame(plan)


def budget_table_texts(plan: StudyPlan, frame: pd.DataFrame) -> dict[str, str]:
    budget = plan.config["budget"]
    excl = " (router excluded)" if budget["router"] == "separate" else " (router included)"
    caption = (
        f"Study {plan.config['study']}: parameter budget per run, R = {budget['total_rank']}, "
        f"K = {budget['active_rank']}, router: {budget['router']}; total_vs_R and "
        f"activated_vs_K are relative deviations from LoRA rank R and rank K{excl}."
    )
    shown = frame.copy()
    for col in ("total", "activated", "router"):
        shown[col] = shown[col].map(_fmt_int)
    for col in ("total_vs_R", "activated_vs_K"):
        shown[col] = shown[col].map(lambda v: "–" if pd.isna(v) else f"{v:+.1%}")
    shown["verified"] = shown["verified"].map({True: "yes", False: "NO"}).fillna("–")
    shown = shown.astype(object).where(shown.notna(), "–").astype(str)
    return {
        "csv": frame.to_csv(index=False),
        "md": caption + "\n\n" + shown.to_markdown(index=False) + "\n",
        "tex": _to_latex(shown, caption, "tab:budget"),
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
    ref_label = row_label(plan, "lora", ref.split("-", 1)[1])
    ref_scores = _per_seed(runs, ref)
    records = []
    base = base_key(plan)
    for key in results.keys:
        if key in (ref, base) or ref_scores.empty:  # no LoRA rank R in the study: no such rows
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
        if row.method != "lora":
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
        "tex": _to_latex(shown, caption, "tab:significance"),
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


TABLE_NAMES = ("main_table", "budget_table", "significance", "provenance")


def table_paths(out_dir: Path) -> list[Path]:
    """Every file :func:`write_tables` writes (provenance has no LaTeX form)."""
    tables = Path(out_dir) / "tables"
    out = []
    for name in TABLE_NAMES:
        for ext in ("csv", "md", "tex") if name != "provenance" else ("csv", "md"):
            out.append(tables / f"{name}.{ext}")
    return out


def write_tables(
    plan: StudyPlan, out_dir: Path | str | None = None, verify: bool = True
) -> list[Path]:
    """Collect the stored results and write every table (CSV, Markdown, LaTeX) atomically
    to ``{out_dir}/tables/``; returns the paths written."""
    out = Path(out_dir or plan.out_dir) / "tables"
    results = collect_results(plan)
    texts = {
        "main_table": main_table_texts(results),
        "budget_table": budget_table_texts(plan, budget_table(plan, verify=verify)),
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
