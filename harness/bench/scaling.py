"""Scaling sweeps: step time against the number of experts (fixed total rank) and against the
total rank (fixed number of experts), for every routed method whose number of experts is
free, beside the reference (peft's LoRA) at the same total ranks."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from harness.adapters import BudgetError, BudgetRequest, Variant, reference_method
from harness.bench.contenders import make_contender, note, release
from harness.bench.timing import summarise, time_round_robin
from harness.plan.study import load_methods

if TYPE_CHECKING:
    from harness.bench.context import BenchContext

#: the ``sweep`` value of the reference rows
REFERENCE_SWEEP = "reference"


def scaling_points(config: dict[str, Any]) -> list[tuple[str, int, int, int]]:
    """``(sweep, G, R, K)``: experts at fixed total rank R (every divisor G >= 2 of R, with
    top-k = max(1, K·G/R) rounded, so the active rank stays near K), and total rank at fixed
    experts (the study's middle granularity, R' = G·2^j, the study's top-k kept)."""
    budget = config["budget"]
    R, K = budget["total_rank"], budget["active_rank"]
    points = []
    for g in range(2, R + 1):
        if R % g:
            continue
        k = max(1, round(K * g / R))
        points.append(("experts", g, R, k * (R // g)))
    grans = sorted(budget["granularities"])
    g = grans[len(grans) // 2]
    k = max(1, K * g // R)
    for j in range(5):
        r_total = g * 2**j
        points.append(("total_rank", g, r_total, k * (r_total // g)))
    return points


def bench_scaling(ctx: BenchContext, log: Callable[[str], None]) -> list[dict]:
    o = ctx.options
    budget = ctx.config["budget"]
    methods = load_methods(ctx.config)
    # routed methods whose expert count is a free choice; MoA's is its number of tasks
    routed = [(m, opts) for m, opts in methods if m.routed and m.sweeps_granularity]
    fixed = [m.name for m, _ in methods if m.routed and not m.sweeps_granularity]
    if fixed:
        note(ctx, f"scaling: {', '.join(fixed)} left out (the number of experts is fixed by the "
                  "method, e.g. one adapter per task)")
    specs = []
    for sweep, g, r_total, k_active in scaling_points(ctx.config):
        request = BudgetRequest(r_total, k_active, (g,), budget.get("router", "separate"),
                                budget.get("tolerance", 0.05), budget["alpha"])
        for method, opts in routed:
            try:
                cfg = method.solve(request, Variant(g, f"G{g}"), ctx.targets, opts)
            except BudgetError as exc:
                ctx.notes.append(f"scaling: {method.name} G={g} R={r_total} skipped: {str(exc)[:120]}")
                continue
            specs.append((sweep, g, r_total, k_active, method.name, cfg))
    ref_ranks = sorted({r for s, _, r, _ in scaling_points(ctx.config)})
    reference = reference_method()
    for r_total in ref_ranks:
        request = BudgetRequest(r_total, r_total, (1,), "separate", budget.get("tolerance", 0.05), budget["alpha"])
        cfg = reference.solve(request, Variant(1, f"r{r_total}", r_total, reference="R"), ctx.targets)
        specs.append((REFERENCE_SWEEP, 1, r_total, r_total, reference.name, cfg))
    contenders = {}
    sweeps: dict[str, list[tuple[str, int]]] = {}
    for sweep, g, r_total, k_active, name, cfg in specs:
        key = f"{name}-G{g}-R{r_total}"
        sweeps.setdefault(key, []).append((sweep, k_active))
        if key not in contenders:
            contenders[key] = make_contender(ctx, key, name, cfg, f"G{g}", g)
    repeats = o.sweep_repeats
    log(f"scaling: {len(contenders)} contenders, {repeats} x {o.sweep_steps} timed steps each")
    time_round_robin(ctx, list(contenders.values()), 1, o.sweep_steps, repeats, 0, log)
    rows = []
    for key, c in contenders.items():
        s = summarise(c)
        r_total = int(key.rpartition("-R")[2])
        for sweep, k_active in sweeps[key]:
            rows.append({
                "sweep": sweep,
                "method": c.method,
                "experts": c.info.get("num_experts"),
                "expert_rank": c.info.get("expert_rank"),
                "top_k": c.info.get("top_k"),
                "total_rank": r_total,
                "active_rank": k_active,
                "path": c.info.get("path", "peft"),
                "trainable_params": c.info["trainable_params"],
                "step_ms_median": s["step_ms_median"],
                "step_ms_iqr": s["step_ms_iqr"],
            })
    release(*contenders.values())
    return rows


def plot_scaling(rows: list[dict], out: Path) -> list[Path]:
    markers = ["o", "s", "^", "D", "v", "P", "X"]
    styles = ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]
    methods = sorted({r["method"] for r in rows if r["sweep"] != REFERENCE_SWEEP})
    references = sorted((r for r in rows if r["sweep"] == REFERENCE_SWEEP), key=lambda r: r["total_rank"])
    fig = Figure(figsize=(10, 4))
    axes = fig.subplots(1, 2)
    for ax, sweep, xkey, xlabel in (
        (axes[0], "experts", "experts", "number of experts E (total rank fixed)"),
        (axes[1], "total_rank", "total_rank", "total rank R (number of experts fixed)"),
    ):
        sub = [r for r in rows if r["sweep"] == sweep]
        for i, m in enumerate(methods):
            pts = sorted((r for r in sub if r["method"] == m), key=lambda r: r[xkey])
            if not pts:
                continue
            ax.plot(
                [p[xkey] for p in pts], [p["step_ms_median"] for p in pts],
                marker=markers[i % len(markers)], linestyle=styles[i % len(styles)], color="0.15",
                markerfacecolor="white", label=m,
            )
        if sweep == "experts" and sub:
            r_fixed = sub[0]["total_rank"]
            ref = [r for r in references if r["total_rank"] == r_fixed]
            if ref:
                ax.axhline(ref[0]["step_ms_median"], color="0.5", linestyle=":",
                           label=f"peft LoRA r={r_fixed}")
            ax.set_title(f"total rank R = {r_fixed}")
        if sweep == "total_rank" and sub:
            ranks = sorted({r["total_rank"] for r in sub})
            ref = [r for r in references if r["total_rank"] in ranks]
            ax.plot([r["total_rank"] for r in ref], [r["step_ms_median"] for r in ref],
                    marker="x", color="0.5", linestyle=":", label="peft LoRA r=R")
            ax.set_title(f"experts E = {sub[0]['experts']}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r[xkey] for r in sub if r[xkey] is not None})
        if ticks:  # the measured values, not powers of two
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training step time (ms, median)")
        ax.grid(True, color="0.85", linewidth=0.6)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "scaling.png", out / "scaling.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150)
    return paths
