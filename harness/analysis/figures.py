"""Figures regenerated from stored run results (matplotlib, Agg; PNG and PDF of each).

Reads the stored results through the one reader (:func:`harness.analysis.results.collect_results`
with the training logs) and trains nothing. Every figure is readable in greyscale: each method has its own marker
and line style as well as its own colour, the heatmap writes its numbers in
the cells, and every axis is labelled with its unit. In figures 1 and 2 the y axis
fits the trained runs; when the untrained base model lies far below them its line
is left off the axis and its value printed instead.

Figures, written to ``{out_dir}/figures/`` by :func:`write_figures`:

1. ``granularity``: the headline. x = number of experts ``G`` at fixed total
   rank R and activated rank K (log2 axis, ticks at the study's G); y = suite
   accuracy (%), the mean over seeds with error bars of one sample standard
   deviation (ddof = 1); one line per method that sweeps G (the routed methods
   and MultiLoRA); a method trained at one point (e.g. MoA over T task adapters) is a
   single marker at its granularity. Horizontal bands: LoRA rank R and rank K (mean ± std
   over seeds); dashed line: the untrained base model. Below, for routed methods: the
   effective number of experts at evaluation (``exp`` of the entropy of the expert
   distribution, mean over modules, mean ± std over seeds) against G, with the line
   "every expert used alike" (= G), so a collapsed sweep is visible at a glance.
2. ``params_vs_acc``: activated adapter parameters (log axis) against suite
   accuracy (%), one point per run; the Pareto front is the step line through the
   runs that no run with at most as many activated parameters beats: run ``i`` is
   on it when ``acc_i > max{acc_j : act_j <= act_i, j != i}`` (ties to the fewer
   parameters); the runs on it are named.
3. ``task_heatmap``: rows method x variant, columns tasks and the suite; cell =
   mean accuracy over seeds minus LoRA rank R's (percentage points); diverging
   colour map centred on 0 and the value written in each cell. The colour scale
   follows the trained rows; the base model's large deficits saturate it.
4. ``expert_load``: per routed method at its finest G, the last logged routing
   shares of each layer, sorted from the largest to the smallest expert within
   the layer, then averaged over layers and seeds (bars; error bars: std over
   layers and seeds); the dashed line is the uniform share 1/G. Each panel also
   gives the normalised entropy ``H = -sum_e p_e ln p_e / ln G`` of the shares
   (1: perfectly balanced, 0: collapsed onto one expert), averaged over layers
   and seeds.
5. ``training_curves``: training loss vs step, the mean over seeds (smoothed by
   a centred moving average over ``max(1, steps // 25)`` steps), one line per
   method at its finest granularity plus the two LoRA references.
6. ``expert_sharing``: per routed method, how much two tasks share experts (the histogram
   intersection of their expert distributions at evaluation, mean over modules and task
   pairs; :mod:`harness.analysis.sharing`) against G, within a task family (solid) and across
   families (dashed), mean ± std over seeds.
7. ``expert_heatmap``: per routed method at its finest G (first seed), each task's share of
   every expert in one representative module (the median module by task overlap).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import matplotlib.lines

matplotlib.use("Agg")

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.analysis.outputs import figure_builder, outputs, write_caption
from harness.analysis.results import (
    StudyResults,
    base_key,
    collect_results,
    display_name,
    is_reference,
    reference_key,
    row_label,
    variant_key,
)
from harness.analysis.sharing import representative_module, sharing_frame
from harness.analysis.tables import main_table
from harness.common.files import atomic_write_bytes

if TYPE_CHECKING:
    from harness.plan.study import StudyPlan

__all__ = [
    "fig_expert_load",
    "fig_granularity",
    "fig_params_vs_acc",
    "fig_task_heatmap",
    "fig_training_curves",
    "method_styles",
    "pareto_front",
    "write_figures",
]

FORMATS = ("png", "pdf")

#: Okabe–Ito colours (colour-blind safe); greyscale relies on markers and line styles
_COLORS = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "h", "<", ">"]
_LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (8, 2))]

_RC = {
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "pdf.fonttype": 42,
    "savefig.bbox": "tight",
}


def method_styles(plan: StudyPlan) -> dict[str, dict[str, Any]]:
    """One colour, marker and line style per method, in the order of the study's methods;
    the reference (LoRA) is always dark grey with round markers."""
    methods: list[str] = []
    references: list[str] = []
    for row in plan.rows:
        target = references if row.reference_method else methods
        if row.method not in target:
            target.append(row.method)
    styles = {
        m: {
            "color": _COLORS[i % len(_COLORS)],
            "marker": _MARKERS[1 + i % (len(_MARKERS) - 1)],
            "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
        }
        for i, m in enumerate(methods)
    }
    for method in references:
        styles[method] = {"color": "0.25", "marker": "o", "linestyle": "-"}
    return styles


def _focus_ylim(ax, values: list[float], base: float | None) -> bool:
    """Fit the y axis to ``values`` (means ± std of the trained runs); the base model's line
    is kept in view only when that does not squash the rest. Returns whether it was left out."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return False
    lo, hi = min(finite), max(finite)
    pad = max(0.5, 0.12 * (hi - lo))
    if base is None or not np.isfinite(base) or lo - (hi - lo) - 2 * pad <= base <= hi + pad:
        return False
    ax.set_ylim(lo - pad, hi + pad)
    return True


def _base_off_axis_note(ax, base: float) -> None:
    ax.text(
        0.01,
        0.01,
        f"base model (untrained) at {base:.1f} %, {'below' if base < ax.get_ylim()[0] else 'above'}"
        " the axis",
        transform=ax.transAxes,
        fontsize=7,
        ha="left",
        va="bottom",
        style="italic",
    )


def _name(method: str) -> str:
    return display_name(method)


def _swept_methods(plan: StudyPlan) -> list[str]:
    """Methods drawn against G: every method but the references and the base model."""
    out: list[str] = []
    for row in plan.rows:
        if not row.reference_method and row.method not in out:
            out.append(row.method)
    return out


def _suite_by_key(results: StudyResults) -> pd.DataFrame:
    """Per method x variant: ``mean``, ``std`` (ddof = 1; NaN for one seed), ``n`` of the
    suite accuracy in %."""
    runs = results.runs.assign(acc=results.runs["suite_acc"].astype(float) * 100)
    grouped = runs.groupby("key", sort=False)["acc"]
    return pd.DataFrame({"mean": grouped.mean(), "std": grouped.std(ddof=1), "n": grouped.size()})


def _band(ax, stats: pd.DataFrame, key: str, label: str, hatch: str, linestyle) -> None:
    if key not in stats.index:
        return
    mean, std = stats.loc[key, "mean"], stats.loc[key, "std"]
    if not pd.isna(std) and std > 0:
        ax.axhspan(
            mean - std,
            mean + std,
            facecolor="0.5",
            alpha=0.18,
            hatch=hatch,
            edgecolor="0.35",
            linewidth=0,
        )
    spread = "" if pd.isna(std) else f" ± {std:.1f}"
    ax.axhline(
        mean,
        color="0.25",
        linestyle=linestyle,
        linewidth=1.3,
        label=f"{label}: {mean:.1f}{spread} %",
    )


# -- 1. granularity vs performance ---------------------------------------------------------


@figure_builder("granularity")
def fig_granularity(results: StudyResults) -> Figure:
    plan = results.plan
    stats = _suite_by_key(results)
    styles = method_styles(plan)
    budget = plan.config["budget"]
    eff = results.runs.groupby("key")["effective_experts"].agg(["mean", "std"])
    routed = any(np.isfinite(v) for v in eff["mean"].to_numpy(dtype=float))
    fig = Figure(figsize=(6.0, 6.4 if routed else 4.0))
    if routed:
        ax, ax_eff = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [2.2, 1.0]})
    else:
        ax, ax_eff = fig.subplots(), None
    methods = _swept_methods(plan)
    grans: set[int] = set(budget["granularities"])
    # small horizontal offsets (in log2 units) keep overlapping error bars apart
    offsets = np.linspace(-0.06, 0.06, len(methods)) if len(methods) > 1 else [0.0]
    for method, offset in zip(methods, offsets):
        rows = [r for r in plan.rows if r.method == method]
        xs, ys, es = [], [], []
        for row in sorted(rows, key=lambda r: r.variant.granularity):
            key = variant_key(method, row.variant.tag)
            if key not in stats.index:
                continue
            g = row.variant.granularity
            grans.add(g)
            xs.append(g * 2**offset)
            ys.append(stats.loc[key, "mean"])
            std = stats.loc[key, "std"]
            es.append(0.0 if pd.isna(std) else std)
        if not xs:
            continue
        style = styles[method]
        label = _name(method)
        if len(rows) == 1 and not rows[0].variant.tag.startswith("G"):
            # one point at its granularity (e.g. MoA over T task adapters: tag T6)
            label += f" ({rows[0].variant.tag})"
        ax.errorbar(
            xs,
            ys,
            yerr=es,
            label=label,
            capsize=3,
            markersize=6,
            linewidth=1.5,
            markerfacecolor="white",
            markeredgewidth=1.4,
            **style,
        )
        if ax_eff is not None:
            keys = [variant_key(method, r.variant.tag) for r in sorted(rows, key=lambda r: r.variant.granularity)]
            points = [(x, eff.loc[k, "mean"], eff.loc[k, "std"]) for x, k in zip(xs, keys)
                      if k in eff.index and np.isfinite(eff.loc[k, "mean"])]
            if points:
                ax_eff.errorbar([p[0] for p in points], [p[1] for p in points],
                                yerr=[0.0 if pd.isna(p[2]) else p[2] for p in points],
                                capsize=2, markersize=5, linewidth=1.2, markerfacecolor="white", **style)
    _band(
        ax,
        stats,
        reference_key(plan, "R"),
        f"LoRA r={budget['total_rank']} (rank R, same total)",
        "///",
        "-",
    )
    _band(
        ax,
        stats,
        reference_key(plan, "K"),
        f"LoRA r={budget['active_rank']} (rank K, same activated)",
        "\\\\\\",
        ":",
    )
    b = base_key(plan)
    base = stats.loc[b, "mean"] if b is not None and b in stats.index else None
    trained = stats.drop(index=[b] if base is not None else [])
    spread = trained["std"].fillna(0.0)
    off_axis = _focus_ylim(ax, [*(trained["mean"] - spread), *(trained["mean"] + spread)], base)
    if base is not None:
        ax.axhline(
            base,
            color="black",
            linestyle="--",
            linewidth=1.0,
            label=f"base model (untrained): {base:.1f} %" + (" (off the axis)" if off_axis else ""),
        )
        if off_axis:
            _base_off_axis_note(ax, base)
    ax.set_xscale("log", base=2)
    ticks = sorted(grans)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    if ticks:
        ax.set_xlim(ticks[0] / 2**0.35, ticks[-1] * 2**0.35)
    xlabel = (
        f"number of experts G (log2 scale; total rank R = {budget['total_rank']}, "
        f"activated rank K = {budget['active_rank']} fixed)"
    )
    if ax_eff is not None:
        ax_eff.plot(ticks, ticks, color="0.6", linestyle=":", linewidth=1.0, label="every expert used alike (= G)")
        ax_eff.set_yscale("log", base=2)
        levels = [2**j for j in range(int(math.log2(max(ticks))) + 2)]
        ax_eff.set_yticks(levels)
        ax_eff.set_yticklabels([str(v) for v in levels])
        ax_eff.minorticks_off()
        ax_eff.set_ylabel("effective experts\n(exp entropy, eval)")
        ax_eff.set_xlabel(xlabel)
        ax_eff.legend(loc="upper left", frameon=False, fontsize=7)
    else:
        ax.set_xlabel(xlabel)
    ax.set_ylabel("suite accuracy (%), mean ± std over seeds")
    n_seeds = len(plan.config["train"]["seeds"])
    ax.set_title(f"{plan.config['study']}: granularity vs accuracy ({n_seeds} seed(s) per point)")
    if ax_eff is not None:
        fig.legend(*ax.get_legend_handles_labels(), loc="upper center", bbox_to_anchor=(0.5, 0.02),
                   ncol=2, frameon=False)
    else:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    return fig


# -- 2. parameters vs performance ------------------------------------------------------------


def pareto_front(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Indices of the points with the highest ``y`` for at most their ``x``, by ascending
    ``x`` (a point joins when its ``y`` beats every point with smaller or equal ``x``)."""
    order = np.lexsort((-y, x))  # by x, then best y first among equal x
    front, best = [], -np.inf
    for i in order:
        if y[i] > best:
            front.append(i)
            best = y[i]
    return np.asarray(front, dtype=int)


@figure_builder("params_vs_acc")
def fig_params_vs_acc(results: StudyResults) -> Figure:
    plan = results.plan
    styles = method_styles(plan)
    runs = results.runs
    trained = runs[runs["method"] != "base"].copy()
    trained["acc"] = trained["suite_acc"].astype(float) * 100
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    for method in styles:
        sub = trained[trained["method"] == method]
        if sub.empty:
            continue
        st = styles[method]
        ax.scatter(
            sub["activated"],
            sub["acc"],
            marker=st["marker"],
            facecolors="white",
            edgecolors=st["color"],
            linewidths=1.3,
            s=36,
            label=_name(method),
            zorder=3,
        )
    ok = trained[trained["activated"] > 0].reset_index(drop=True)
    if len(ok):
        x = ok["activated"].to_numpy(dtype=float)
        y = ok["acc"].to_numpy(dtype=float)
        idx = pareto_front(x, y)
        fx, fy = x[idx], y[idx]
        ax.step(
            np.append(fx, x.max() * 1.15),
            np.append(fy, fy[-1]),
            where="post",
            color="black",
            linewidth=1.2,
            linestyle="-",
            label="Pareto front (best accuracy for ≤ activated parameters)",
            zorder=2,
        )
        labelled = set()
        for n, i in enumerate(idx):  # name the runs on the front, once per method x variant
            key = ok.loc[i, "key"]
            if key in labelled:
                continue
            labelled.add(key)
            ax.annotate(
                row_label(plan, ok.loc[i, "method"], ok.loc[i, "variant"]),
                (x[i], y[i]),
                textcoords="offset points",
                xytext=(4, 6) if n == 0 else (-4, 6),
                ha="left" if n == 0 else "right",
                fontsize=6.5,
                color="0.15",
            )
    b = base_key(plan)
    if b is not None:
        base = runs[runs["key"] == b]["suite_acc"].astype(float).mean() * 100
        off_axis = _focus_ylim(ax, list(trained["acc"]), base)
        ax.axhline(
            base,
            color="black",
            linestyle="--",
            linewidth=1.0,
            label=f"base model (0 adapter params): {base:.1f} %"
            + (" (off the axis)" if off_axis else ""),
        )
        if off_axis:
            _base_off_axis_note(ax, base)
    ax.set_xscale("log")
    ax.set_xlabel("activated adapter parameters per token (count, log scale; router included)")
    ax.set_ylabel("suite accuracy (%)")
    ax.set_title(f"{plan.config['study']}: activated parameters vs accuracy (one point per run)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    return fig


@figure_builder("cost")
def fig_cost(results: StudyResults) -> Figure:
    """Accuracy against what training cost, one point per method x variant (mean over
    seeds, error bars: std of the suite score): left, the measured peak memory of the
    training process (CUDA's max_memory_allocated when recorded, else RSS); right, the
    training wall time."""
    plan = results.plan
    styles = method_styles(plan)
    runs = results.runs[results.runs["method"] != "base"]
    fig = Figure(figsize=(8.0, 3.6))
    axes = fig.subplots(1, 2, sharey=True)
    cuda = "cost:cuda_max_allocated_mib" in runs and runs["cost:cuda_max_allocated_mib"].notna().any()
    memory_col = "cost:cuda_max_allocated_mib" if cuda else "cost:peak_rss_mib"
    recorded = memory_col in runs and runs[memory_col].notna().any()
    for ax, col, xlabel in (
        (axes[0], memory_col, "peak CUDA memory allocated (MiB)" if cuda else "peak resident memory of the training process (MiB)"),
        (axes[1], "train_s", "training wall time (s, without the shared lower-layer cache)"),
    ):
        if col == memory_col and not recorded:
            ax.text(0.5, 0.5, "no run recorded its memory\n(train.json has no 'cost')",
                    transform=ax.transAxes, ha="center", va="center", fontsize=8)
        for _, group in runs.groupby("key", sort=False):
            if col not in group or group[col].isna().all():
                continue
            method = group.iloc[0]["method"]
            st = styles.get(method, {"color": "0.3", "marker": "o"})
            acc = group["suite_acc"].astype(float) * 100
            ax.errorbar(
                group[col].astype(float).mean(), acc.mean(),
                yerr=acc.std(ddof=1) if len(acc) > 1 else None,
                fmt=st["marker"], color=st["color"], markerfacecolor="white", capsize=2, markersize=5,
            )
            ax.annotate(group.iloc[0]["variant"], (group[col].astype(float).mean(), acc.mean()),
                        textcoords="offset points", xytext=(3, 3), fontsize=6, color="0.3")
        ax.set_xlabel(xlabel)
    axes[0].set_ylabel("suite accuracy (%)")
    handles = [
        matplotlib.lines.Line2D([], [], linestyle="", marker=st["marker"], color=st["color"],
                                markerfacecolor="white", label=_name(m))
        for m, st in styles.items()
    ]
    fig.legend(handles=handles, loc="lower center", ncol=min(6, len(handles)), frameon=False,
               bbox_to_anchor=(0.5, -0.08))
    fig.suptitle(f"{plan.config['study']}: accuracy vs measured cost (mean ± std over seeds)")
    return fig


# -- 3. per-task heatmap ---------------------------------------------------------------------


@figure_builder("task_heatmap")
def fig_task_heatmap(results: StudyResults) -> Figure:
    plan = results.plan
    table = main_table(results).set_index("label")
    ref = reference_key(plan, "R")
    ref_label = row_label(plan, *ref.split("-", 1)) if ref else None
    columns = [*results.tasks, "suite_mean"]
    if ref_label is not None and ref_label in table.index:
        delta = table[columns].astype(float) - table.loc[ref_label, columns].astype(float)
        delta = delta.drop(index=ref_label)
    else:  # no LoRA rank R in this study: the deltas are taken against the study's mean row
        ref_label = "the mean of all rows"
        delta = table[columns].astype(float) - table[columns].astype(float).mean()
    values = delta.to_numpy()
    # the colour scale follows the trained rows; the base model's (large) deficits saturate,
    # their numbers are still written in the cells
    b = base_key(plan)
    base_label = row_label(plan, "base", "G0") if b is not None else None
    scale_rows = delta.drop(index=[base_label]) if base_label in delta.index else delta
    finite = np.abs(scale_rows.to_numpy()[np.isfinite(scale_rows.to_numpy())])
    vmax = max(float(finite.max()) if finite.size else 0.0, 1.0)
    clipped = bool(np.nanmax(np.abs(values)) > vmax) if np.isfinite(values).any() else False
    n_rows, n_cols = values.shape
    fig = Figure(figsize=(max(4.5, 1.0 * n_cols + 3.0), max(2.5, 0.36 * n_rows + 1.6)))
    ax = fig.subplots()
    image = ax.imshow(values, cmap="RdBu", vmin=-vmax, vmax=vmax, aspect="auto")
    for i in range(n_rows):
        for j in range(n_cols):
            v = values[i, j]
            text = "n/a" if not np.isfinite(v) else f"{v:+.1f}"
            dark = np.isfinite(v) and abs(v) > 0.55 * vmax
            ax.text(
                j,
                i,
                text,
                ha="center",
                va="center",
                fontsize=7.5,
                color="white" if dark else "black",
            )
    ax.set_xticks(range(n_cols))
    ax.set_xticklabels([*results.tasks, "suite"], rotation=30, ha="right")
    ax.set_yticks(range(n_rows))
    ax.set_yticklabels(delta.index)
    ax.axvline(n_cols - 1.5, color="black", linewidth=1.0)
    ax.grid(False)
    ax.set_xlabel("task")
    colorbar = fig.colorbar(
        image, ax=ax, fraction=0.046, pad=0.03, extend="both" if clipped else "neither"
    )
    colorbar.set_label(
        f"accuracy − {ref_label} (percentage points)"
        + (f"\ncolour saturates beyond ±{vmax:.1f}" if clipped else "")
    )
    ax.set_title(
        f"{plan.config['study']}: per-task accuracy relative to {ref_label} (mean over seeds)"
    )
    return fig


# -- 4. expert load --------------------------------------------------------------------------


def _routed_finest(plan: StudyPlan) -> list[tuple[str, int, str]]:
    """``(method, G, tag)`` of each routed method at its finest granularity."""
    out: dict[str, tuple[int, str]] = {}
    for row in plan.rows:
        if row.routed:
            g = row.variant.granularity
            if row.method not in out or g > out[row.method][0]:
                out[row.method] = (g, row.variant.tag)
    return [(m, g, tag) for m, (g, tag) in out.items()]


def load_profile(loads: pd.DataFrame, key: str) -> dict[str, Any] | None:
    """Sorted routing shares for one method x variant: per-position mean and std over
    (layer, seed) pairs, the mean normalised entropy and the number of (layer, seed) pairs."""
    sub = loads[loads["key"] == key]
    if sub.empty:
        return None
    sorted_rows = []
    entropies = []
    for _, group in sub.groupby(["run_id", "layer"], sort=False):
        shares = group.sort_values("order")["share"].to_numpy(dtype=float)
        total = shares.sum()
        p = shares / total if total > 0 else shares
        sorted_rows.append(p)
        g = len(p)
        nz = p[p > 0]
        entropies.append(float(-(nz * np.log(nz)).sum() / math.log(g)) if g > 1 else 1.0)
    width = max(len(r) for r in sorted_rows)
    matrix = np.full((len(sorted_rows), width), np.nan)
    for i, r in enumerate(sorted_rows):
        matrix[i, : len(r)] = r
    return {
        "mean": np.nanmean(matrix, axis=0),
        "std": np.nanstd(matrix, axis=0),
        "entropy": float(np.mean(entropies)),
        "pairs": len(sorted_rows),
        "step": int(sub["step"].max()),
    }


@figure_builder("expert_load")
def fig_expert_load(results: StudyResults) -> Figure:
    plan = results.plan
    styles = method_styles(plan)
    panels = _routed_finest(plan)
    if not panels:
        fig = Figure(figsize=(5.0, 2.0))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(
            0.5,
            0.5,
            "no routed method in this study: no expert load to show",
            ha="center",
            va="center",
        )
        return fig
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 2.9 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax, (method, g, tag) in zip(axes, panels):
        key = variant_key(method, tag)
        profile = load_profile(results.loads, key)
        ax.set_title(f"{_name(method)}, G = {g}")
        ax.set_xlabel("expert, sorted by share (rank)")
        ax.set_ylabel("share of routing (%)")
        if profile is None:
            ax.text(
                0.5, 0.5, "no expert load logged", ha="center", va="center", transform=ax.transAxes
            )
            continue
        mean, std = profile["mean"] * 100, profile["std"] * 100
        x = np.arange(1, len(mean) + 1)
        ax.bar(
            x,
            mean,
            yerr=std,
            color=styles[method]["color"],
            edgecolor="black",
            linewidth=0.5,
            error_kw={"elinewidth": 0.8, "capsize": 1.5},
        )
        ax.axhline(100 / len(mean), color="black", linestyle="--", linewidth=1.0)
        ax.text(
            0.97,
            0.95,
            f"dashed: uniform 1/G = {100 / len(mean):.1f} %\n"
            f"largest share = {mean[0]:.1f} %\n"
            f"entropy / ln G = {profile['entropy']:.2f}\n"
            f"{profile['pairs']} layer×seed, step {profile['step']}",
            transform=ax.transAxes,
            ha="right",
            va="top",
            fontsize=6.5,
            bbox={"facecolor": "white", "edgecolor": "0.6", "alpha": 0.9},
        )
        step = max(1, math.ceil(len(x) / 12))
        ax.set_xticks(x[::step])
        ax.set_xlim(0.3, len(x) + 0.7)
    for ax in axes[n:]:
        ax.axis("off")
    fig.suptitle(
        f"{plan.config['study']}: expert load at the end of training (mean over layers and seeds)"
    )
    return fig


# -- 5. training curves ----------------------------------------------------------------------


def _curve_keys(plan: StudyPlan) -> list[tuple[str, str]]:
    """``(key, legend label)``: the references and every other method at its finest G."""
    keys = []
    for which in ("R", "K"):
        key = reference_key(plan, which)
        if key is not None:
            keys.append((key, row_label(plan, *key.split("-", 1))))
    finest: dict[str, tuple[int, str]] = {}
    for row in plan.rows:
        if row.reference_method:
            continue
        g = row.variant.granularity
        if row.method not in finest or g > finest[row.method][0]:
            finest[row.method] = (g, row.variant.tag)
    for method, (_g, tag) in finest.items():
        keys.append((variant_key(method, tag), row_label(plan, method, tag)))
    return keys


@figure_builder("training_curves")
def fig_training_curves(results: StudyResults) -> Figure:
    plan = results.plan
    styles = method_styles(plan)
    curves = results.curves
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    lora_styles = {"R": ("0.15", "-", "o"), "K": ("0.45", ":", "o")}
    keys = _curve_keys(plan)
    n_lines = len(keys)
    for line_no, (key, label) in enumerate(keys):
        sub = curves[curves["key"] == key]
        if sub.empty:
            continue
        mean = sub.groupby("step")["loss"].mean().sort_index()
        window = max(1, len(mean) // 25)
        smooth = mean.rolling(window, center=True, min_periods=1).mean()
        every = max(1, len(smooth) // 8)  # markers staggered between lines
        method = key.split("-", 1)[0]
        if is_reference(plan, method):
            which = "R" if key == reference_key(plan, "R") else "K"
            color, ls, marker = lora_styles[which]
        else:
            st = styles[method]
            color, ls, marker = st["color"], st["linestyle"], st["marker"]
        ax.plot(
            smooth.index,
            smooth.values,
            color=color,
            linestyle=ls,
            marker=marker,
            markevery=((line_no * every // max(1, n_lines)) % every, every),
            markersize=5,
            markerfacecolor="white",
            linewidth=1.4,
            label=label,
        )
    ax.set_xlabel("training step (optimizer updates)")
    ax.set_ylabel("training loss (cross-entropy at the answer, nats)")
    n_seeds = len(plan.config["train"]["seeds"])
    ax.set_title(f"{plan.config['study']}: training loss, mean over {n_seeds} seed(s)")
    ax.legend(loc="upper right", frameon=False, ncol=2 if len(ax.lines) > 5 else 1)
    return fig


# -- 6. where the experts go -------------------------------------------------------------------


@figure_builder("expert_sharing")
def fig_expert_sharing(results: StudyResults) -> Figure:
    """Per routed method: the mean overlap of two tasks' expert distributions (histogram
    intersection, averaged over modules and task pairs; :mod:`harness.analysis.sharing`) against G,
    within a task family (solid) and across families (dashed); mean ± std over seeds."""
    plan = results.plan
    styles = method_styles(plan)
    frame = sharing_frame(results)
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.subplots()
    if frame.empty:
        ax.axis("off")
        ax.text(0.5, 0.5, "no routed run recorded its experts: nothing to show", ha="center", va="center")
        return fig
    with_families = frame["within"].notna().any()
    columns = (("within", "-", "within a family"), ("across", "--", "across families")) if with_families \
        else (("all_pairs", "-", "all task pairs"),)
    for method, group in frame.groupby("method", sort=False):
        stats = group.groupby("granularity")[[c for c, _, _ in columns]].agg(["mean", "std"])
        xs = list(stats.index)
        for column, linestyle, words in columns:
            ax.errorbar(xs, stats[(column, "mean")], yerr=stats[(column, "std")].fillna(0.0), capsize=2,
                        color=styles[method]["color"], marker=styles[method]["marker"], linestyle=linestyle,
                        markerfacecolor="white", linewidth=1.3, label=f"{_name(method)}, {words}")
    ax.set_xscale("log", base=2)
    ticks = sorted(frame["granularity"].unique())
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("number of experts G (log2 scale)")
    ax.set_ylabel("expert overlap of two tasks\n(histogram intersection; 1 = the same experts)")
    ax.set_title(f"{plan.config['study']}: expert sharing within and across task families")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False, fontsize=7)
    return fig


@figure_builder("expert_heatmap")
def fig_expert_heatmap(results: StudyResults) -> Figure:
    """Per routed method at its finest granularity (first seed), the share of each expert
    (columns) in each task's scored sequences (rows), in one representative module (the
    one whose task overlap is the median over modules; named in the panel title)."""
    plan = results.plan
    panels = []
    for method, g, tag in _routed_finest(plan):
        runs = results.runs[(results.runs["key"] == variant_key(method, tag))].sort_values("seed")
        routing = next((results.routing[r] for r in runs["run_id"] if r in results.routing), None)
        if routing:
            panels.append((method, g, routing))
    if not panels:
        fig = Figure(figsize=(5.0, 2.0))
        ax = fig.subplots()
        ax.axis("off")
        ax.text(0.5, 0.5, "no routed run recorded its experts: nothing to show", ha="center", va="center")
        return fig
    cols = min(len(panels), 2)
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.2 * cols, 2.6 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    families = results.families or {}
    for ax, (method, g, routing) in zip(axes, panels):
        module = representative_module(routing)
        by_task = routing["shares"][module]
        tasks = [t for t in results.tasks if t in by_task]
        matrix = np.asarray([by_task[t] for t in tasks]) * 100
        image = ax.imshow(matrix, cmap="Greys", vmin=0, vmax=max(1.0, float(matrix.max())), aspect="auto")
        ax.set_yticks(range(len(tasks)))
        ax.set_yticklabels([f"{t} ({families[t]})" if t in families else t for t in tasks], fontsize=7)
        n_experts = matrix.shape[1]
        step = max(1, math.ceil(n_experts / 12))
        ax.set_xticks(range(0, n_experts, step))
        ax.set_xlabel("expert")
        short = module.replace("model.layers.", "layer ")
        ax.set_title(f"{_name(method)}, G = {g}: {short}", fontsize=8)
        ax.grid(False)
        fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02).set_label("share of the task's routing (%)", fontsize=7)
    for ax in axes[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{plan.config['study']}: which experts each task uses (evaluation, first seed)")
    return fig


# -- writing -----------------------------------------------------------------------------------


def _save(fig: Figure, base: Path, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    written = []
    for ext in formats:
        buffer = io.BytesIO()
        metadata = {"Software": None} if ext == "png" else {"CreationDate": None}
        fig.savefig(buffer, format=ext, dpi=200, metadata=metadata)
        path = base.with_suffix(f".{ext}")
        atomic_write_bytes(path, buffer.getvalue())
        written.append(path)
    return written


def write_figures(plan: StudyPlan, out_dir: Path | str | None = None) -> list[Path]:
    """Collect the stored results (with training logs) and write every figure of the outputs
    registry as PNG and PDF to ``{out_dir}/figures/``, with its report caption; returns the
    paths written."""
    out = Path(out_dir or plan.out_dir)
    results = collect_results(plan, logs=True)
    written = []
    with matplotlib.rc_context(_RC):
        for entry in outputs("figure"):
            fig = entry.build()(results)
            written += _save(fig, out / "figures" / entry.name, entry.formats)
            written.append(write_caption(entry, out))
    return written
