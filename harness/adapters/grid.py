"""Budget primitives every method builds on: parameter counts, the request, the granularity grid.

A budget is stated once per study, per adapted module: ``total_rank R`` and
``active_rank K``. Granularity ``G`` is the number of rank blocks (experts): each
expert has rank ``R/G`` and ``k = K·G/R`` experts are active. The references are
LoRA of rank ``R`` (same total) and rank ``K`` (same activated).

Accounting modes (``BudgetRequest.router``):

* ``separate`` — ranks matched, router parameters listed beside them (the papers'
  convention);
* ``counted`` — the router must fit inside the same total: :func:`fit_router_counted`
  shrinks the expert rank (then, if that is not enough, the number of experts) until
  the total (adapter + router, summed over all adapted modules) is within
  ``tolerance`` of LoRA rank ``R``'s, or refuses and lists the nearest configurations
  that fit.

The study-level solver (one row per run, checks against real modules) is the engine's
:mod:`harness.plan.budget`; this module holds only what a method's ``solve`` needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from harness.adapters.errors import BudgetError


@dataclass(frozen=True)
class ParamCount:
    """Trainable adapter parameters: ``total`` that exist, ``activated`` that shape one
    token's output, and ``router`` (gate) parameters, which are counted inside both."""

    total: int
    activated: int
    router: int

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(
            self.total + other.total,
            self.activated + other.activated,
            self.router + other.router,
        )

    @staticmethod
    def sum(counts: Iterable[ParamCount]) -> ParamCount:
        out = ParamCount(0, 0, 0)
        for c in counts:
            out = out + c
        return out


@dataclass(frozen=True)
class TargetShape:
    """One adapted linear layer: its qualified name and its shape ``d_in -> d_out``."""

    name: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class Variant:
    """One point of a method's sweep: ``granularity`` rank blocks (1 for a single LoRA),
    a short ``tag`` for run ids (``G8``, ``r64``), and for a reference run its ``role``
    (words for tables) and ``reference``: ``"R"`` (same total as every mixture) or ``"K"``
    (same activated parameters as the sparse mixtures)."""

    granularity: int
    tag: str
    rank: int | None = None
    role: str = ""
    reference: str | None = None


ROUTER_MODES = ("separate", "counted")


@dataclass(frozen=True)
class BudgetRequest:
    total_rank: int
    active_rank: int
    granularities: tuple[int, ...]
    router: str = "separate"
    tolerance: float = 0.05
    alpha: float = 16.0

    def __post_init__(self) -> None:
        R, K = self.total_rank, self.active_rank
        if not (isinstance(R, int) and R >= 1):
            raise BudgetError(f"budget.total_rank must be a positive integer, got {R!r}")
        if not (isinstance(K, int) and 1 <= K <= R):
            raise BudgetError(
                f"budget.active_rank must be an integer between 1 and total_rank={R}, got {K!r}"
            )
        if self.router not in ROUTER_MODES:
            raise BudgetError(
                f"budget.router must be one of {', '.join(ROUTER_MODES)}, got {self.router!r}"
            )
        if not 0 <= self.tolerance < 1:
            raise BudgetError(f"budget.tolerance must be in [0, 1), got {self.tolerance!r}")

    @classmethod
    def from_config(cls, budget: dict[str, Any]) -> BudgetRequest:
        return cls(
            total_rank=budget["total_rank"],
            active_rank=budget["active_rank"],
            granularities=tuple(budget["granularities"]),
            router=budget.get("router", "separate"),
            tolerance=budget.get("tolerance", 0.05),
            alpha=budget.get("alpha", 16.0),
        )


# -- the granularity grid --------------------------------------------------------------


def feasible_granularities(total_rank: int, active_rank: int) -> list[int]:
    """Granularities ``G`` that divide ``R`` and give a whole top-k ``K·G/R >= 1``."""
    return [
        g
        for g in range(1, total_rank + 1)
        if total_rank % g == 0 and (active_rank * g) % total_rank == 0
    ]


def nearest(values: list[int], target: float, n: int = 2) -> list[int]:
    return sorted(sorted(values, key=lambda v: (abs(math.log(v / target)), v))[:n])


def standard_grid(
    request: BudgetRequest, granularity: int, need_top_k: bool = True
) -> tuple[int, int, int | None]:
    """``(experts, expert_rank, top_k)`` for granularity ``G``: ``(G, R/G, K·G/R)``."""
    R, K, G = request.total_rank, request.active_rank, granularity
    feasible = feasible_granularities(R, K)
    if not isinstance(G, int) or G < 1:
        raise BudgetError(f"granularity {G!r} must be a positive integer; feasible: {feasible}")
    if R % G:
        near = nearest(feasible, G)
        raise BudgetError(
            f"granularity {G} does not divide total_rank {R} (experts would have rank "
            f"{R / G:.3g}); feasible granularities for R={R}, K={K}: {feasible}; "
            f"nearest: {near}"
        )
    if not need_top_k:
        return G, R // G, None
    if (K * G) % R:
        near = nearest(feasible, G)
        raise BudgetError(
            f"granularity {G} gives top-k = active_rank·G/total_rank = {K}·{G}/{R} = "
            f"{K * G / R:.3g}, not a whole number of experts; feasible granularities for "
            f"R={R}, K={K}: {feasible}; nearest: {near}"
        )
    return G, R // G, K * G // R


# -- depth: where each adapted module sits --------------------------------------------------


def layer_index(name: str) -> int | None:
    """The decoder layer of a target module's qualified name: its first all-digit component
    (``model.layers.7.mlp.up_proj`` -> 7); ``None`` for a name without one."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


def layer_positions(shapes: Iterable[TargetShape]) -> dict[str, tuple[int, int]]:
    """Target name -> ``(position, layers)``: its decoder layer's rank among the adapted
    decoder layers (0 = the lowest) and their number. A name without a layer index is at
    position 0 (a lone layer, as in ``check_layer``)."""
    names = [s.name for s in shapes]
    indices = sorted({i for i in map(layer_index, names) if i is not None})
    rank = {i: p for p, i in enumerate(indices)}
    layers = max(1, len(indices))
    return {n: (rank.get(layer_index(n), 0), layers) for n in names}


# -- totals ------------------------------------------------------------------------------


def lora_count(rank: int, shapes: list[TargetShape]) -> int:
    return sum(rank * (s.d_in + s.d_out) for s in shapes)


def deviation(value: int, target: int) -> float:
    return (value - target) / target if target else 0.0


def _counted_candidates(
    method: Any, config: Any, shapes: list[TargetShape], target: int, vary_experts: bool = True
) -> list[tuple[int, int, float, Any]]:
    """Every ``(experts, expert_rank)`` at or below the config's, with its deviation from target."""
    out = []
    lowest = (config.top_k or 1) if vary_experts else config.num_experts
    for experts in range(config.num_experts, lowest - 1, -1):
        for rank in range(config.expert_rank, 0, -1):
            candidate = dataclasses.replace(config, num_experts=experts, expert_rank=rank)
            dev = deviation(method.count_model(candidate, shapes).total, target)
            out.append((experts, rank, dev, candidate))
    return out


def fit_router_counted(
    method: Any,
    config: Any,
    request: BudgetRequest,
    shapes: list[TargetShape],
    vary_experts: bool = True,
) -> Any:
    """``router: counted``: shrink the ranks until the total, router included, is within
    ``tolerance`` of LoRA rank ``R``'s total.

    ``config`` has ``num_experts``, ``expert_rank`` and ``top_k``; ``method.count_model``
    counts it. The expert rank shrinks first (the granularity stays); if no expert rank
    fits, experts are dropped (never below top-k; never with ``vary_experts=False``, for
    methods whose number of experts is fixed, e.g. one per task). Among fitting
    configurations the one with the most experts, then the largest expert rank, is
    chosen. If none fits, the refusal lists the nearest configurations that do, at any
    granularity (``vary_experts``), or the closest miss.
    """
    target = lora_count(request.total_rank, shapes)
    candidates = _counted_candidates(method, config, shapes, target, vary_experts)
    fitting = [c for c in candidates if abs(c[2]) <= request.tolerance]
    if fitting:
        return max(fitting, key=lambda c: (c[0], c[1], -abs(c[2])))[3]
    if not vary_experts:
        closest, rank = min((abs(c[2]), c[1]) for c in candidates)
        raise BudgetError(
            f"{method.name} with {config.num_experts} experts (a number fixed by the method): "
            f"with router: counted no expert rank at most {config.expert_rank} puts the total "
            f"(adapters + router) within {request.tolerance:.1%} of LoRA rank "
            f"{request.total_rank}'s {target:,} parameters (closest: rank {rank}, {closest:.1%} "
            f"off). Raise budget.tolerance to at least {closest:.1%}, or use router: separate."
        )
    raise BudgetError(_counted_refusal(method, config, request, shapes, target))


def _counted_refusal(
    method: Any,
    config: Any,
    request: BudgetRequest,
    shapes: list[TargetShape],
    target: int,
) -> str:
    G = config.num_experts
    closest = min(abs(c[2]) for c in _counted_candidates(method, config, shapes, target))
    options = []
    for g in feasible_granularities(request.total_rank, request.active_rank):
        base = dataclasses.replace(
            config,
            num_experts=g,
            expert_rank=request.total_rank // g,
            top_k=None if config.top_k is None else request.active_rank * g // request.total_rank,
        )
        fits = [
            c for c in _counted_candidates(method, base, shapes, target) if abs(c[2]) <= request.tolerance
        ]
        if fits:
            e, r, dev, _ = max(fits, key=lambda c: (c[0], c[1], -abs(c[2])))
            options.append((abs(math.log(g / G)), g, e, r, dev))
    listed = (
        "; ".join(
            f"G={g}: {e} experts of rank {r} (total {d:+.1%})" for _, g, e, r, d in sorted(options)[:4]
        )
        or "none"
    )
    return (
        f"{method.name} at granularity {G}: with router: counted no configuration of at most "
        f"{config.num_experts} experts of rank at most {config.expert_rank} puts the total "
        f"(adapter + router) within {request.tolerance:.1%} of LoRA rank {request.total_rank}'s "
        f"{target:,} parameters (closest: {closest:.1%} off). Nearest feasible configurations: "
        f"{listed}. Raise budget.tolerance to at least {closest:.1%}, or use router: separate."
    )
