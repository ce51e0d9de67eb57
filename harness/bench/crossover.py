"""Dense vs sparse execution of one routed method at growing expert counts: where gathering
only the selected rank blocks starts to pay (:data:`harness.adapters.core.SPARSE_CROSSOVER_RATIO`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from harness.adapters import BudgetRequest, Variant, get_method
from harness.adapters.core import choose_path
from harness.bench.contenders import make_contender, release
from harness.bench.timing import summarise, time_round_robin
from harness.plan.study import load_methods

if TYPE_CHECKING:
    from harness.bench.context import BenchContext


def bench_crossover(ctx: BenchContext, log: Callable[[str], None]) -> list[dict]:
    """Dense vs sparse execution of one routed method at growing expert counts: rank-1
    experts, top-k = the study's active rank K (so the active rank stays K), total rank = E."""
    o = ctx.options
    budget = ctx.config["budget"]
    K = budget["active_rank"]
    name = o.crossover_method
    options = dict(next((opts for m, opts in load_methods(ctx.config) if m.name == name), {}))
    options.pop("path", None)
    method = get_method(name)
    rows = []
    pairs = []
    for experts in o.crossover_experts:
        if experts <= K:
            continue
        request = BudgetRequest(experts, K, (experts,), "separate", budget["tolerance"], budget["alpha"])
        base = method.solve(request, Variant(experts, f"G{experts}"), ctx.targets, options)
        pair = []
        for path in ("dense", "sparse"):
            cfg = dataclasses.replace(base, path=path)
            pair.append(make_contender(ctx, f"{name}-E{experts}-{path}", name, cfg, f"G{experts}", experts))
        pairs.append((experts, base, pair))
    contenders = [c for _, _, pair in pairs for c in pair]
    log(f"crossover: {name}, {len(pairs)} expert counts x dense/sparse, "
        f"{o.sweep_repeats} x {o.sweep_steps} timed steps each")
    time_round_robin(ctx, contenders, 1, o.sweep_steps, o.sweep_repeats, 0, log)
    for experts, base, (dense, sparse) in pairs:
        sd, ss = summarise(dense), summarise(sparse)
        for c, s in ((dense, sd), (sparse, ss)):
            rows.append(
                {
                    "method": name,
                    "experts": experts,
                    "expert_rank": base.expert_rank,
                    "top_k": base.top_k,
                    "experts_per_top_k": experts / base.top_k,
                    "path": c.method_config.path,
                    "step_ms_median": s["step_ms_median"],
                    "step_ms_iqr": s["step_ms_iqr"],
                    "sparse_over_dense": ss["step_ms_median"] / sd["step_ms_median"],
                    "auto_picks": choose_path("auto", experts, base.top_k),
                }
            )
    release(*contenders)
    return rows


def crossover_point(rows: list[dict]) -> float | None:
    """The smallest ``experts / top-k`` from which on the sparse path is faster at every
    measured point (``None``: dense wins somewhere at the largest counts). Rows may come from
    the bench or from its CSV (numbers as text)."""
    ratios = sorted({float(r["experts_per_top_k"]): float(r["sparse_over_dense"]) for r in rows}.items())
    point = None
    for ratio, rel in reversed(ratios):
        if rel < 1.0:
            point = ratio
        else:
            break
    return point
