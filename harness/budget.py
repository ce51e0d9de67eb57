"""Budgets: the solver that turns (R, K, granularities, accounting mode) into every method's
hyperparameters, and the parameter accounting behind every table.

A budget is stated once per study, per adapted module: ``total_rank R`` and
``active_rank K``. Granularity ``G`` is the number of rank blocks (experts):
each expert has rank ``R/G`` and ``k = K·G/R`` experts are active. The
references are LoRA of rank ``R`` (same total) and rank ``K`` (same activated).

Accounting modes:

* ``router: separate`` — ranks matched, router parameters listed beside them
  (the papers' convention);
* ``router: counted`` — the router must fit inside the same total: the solver
  shrinks the expert rank (then, if that is not enough, the number of experts)
  until the total (adapter + router, summed over all adapted modules) is within
  ``tolerance`` of LoRA rank ``R``'s, or refuses and lists the nearest
  configurations that fit.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from harness.methods.base import (
    BudgetError,
    Method,
    MethodConfig,
    ParamCount,
    TargetShape,
    Variant,
)

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


def _nearest(values: list[int], target: float, n: int = 2) -> list[int]:
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
        near = _nearest(feasible, G)
        raise BudgetError(
            f"granularity {G} does not divide total_rank {R} (experts would have rank "
            f"{R / G:.3g}); feasible granularities for R={R}, K={K}: {feasible}; "
            f"nearest: {near}"
        )
    if not need_top_k:
        return G, R // G, None
    if (K * G) % R:
        near = _nearest(feasible, G)
        raise BudgetError(
            f"granularity {G} gives top-k = active_rank·G/total_rank = {K}·{G}/{R} = "
            f"{K * G / R:.3g}, not a whole number of experts; feasible granularities for "
            f"R={R}, K={K}: {feasible}; nearest: {near}"
        )
    return G, R // G, K * G // R


# -- totals ------------------------------------------------------------------------------


def lora_count(rank: int, shapes: list[TargetShape]) -> int:
    return sum(rank * (s.d_in + s.d_out) for s in shapes)


def _deviation(value: int, target: int) -> float:
    return (value - target) / target if target else 0.0


def _counted_candidates(
    method: Method, config: MethodConfig, shapes: list[TargetShape], target: int
) -> list[tuple[int, int, float, MethodConfig]]:
    """Every ``(experts, expert_rank)`` at or below the config's, with its deviation from target."""
    out = []
    lowest = config.top_k or 1
    for experts in range(config.num_experts, lowest - 1, -1):
        for rank in range(config.expert_rank, 0, -1):
            candidate = dataclasses.replace(config, num_experts=experts, expert_rank=rank)
            dev = _deviation(method.count_model(candidate, shapes).total, target)
            out.append((experts, rank, dev, candidate))
    return out


def fit_router_counted(
    method: Method, config: MethodConfig, request: BudgetRequest, shapes: list[TargetShape]
) -> MethodConfig:
    """``router: counted``: shrink the ranks until the total, router included, is within
    ``tolerance`` of LoRA rank ``R``'s total.

    The expert rank shrinks first (the granularity stays); if no expert rank fits,
    experts are dropped (never below top-k). Among fitting configurations the one
    with the most experts, then the largest expert rank, is chosen. If none fits,
    the refusal lists the nearest configurations that do, at any granularity.
    """
    target = lora_count(request.total_rank, shapes)
    fitting = [
        c for c in _counted_candidates(method, config, shapes, target) if abs(c[2]) <= request.tolerance
    ]
    if fitting:
        return max(fitting, key=lambda c: (c[0], c[1], -abs(c[2])))[3]
    raise BudgetError(_counted_refusal(method, config, request, shapes, target))


def _counted_refusal(
    method: Method,
    config: MethodConfig,
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


# -- one row per run ---------------------------------------------------------------------


@dataclass
class BudgetRow:
    method: str
    variant: Variant
    config: MethodConfig
    counts: ParamCount
    target_total: int
    target_activated: int
    dense: bool
    routed: bool
    router_mode: str
    description: dict[str, Any] = field(default_factory=dict)
    verified_total: int | None = None

    def matched(self, count: int) -> int:
        """The number compared with the LoRA references: without the router under
        ``router: separate`` (listed beside), with it under ``router: counted``."""
        return count - self.counts.router if self.router_mode == "separate" else count

    @property
    def label(self) -> str:
        return f"{self.method}-{self.variant.tag}"

    def as_dict(self) -> dict[str, Any]:
        note = []
        if self.variant.role:
            note.append(self.variant.role)
        if self.dense and self.routed:
            note.append("dense: every expert active, activated budget not matched")
        elif self.dense and self.method != "lora":
            note.append("dense: activated budget not matched")
        else:
            active_dev = _deviation(self.matched(self.counts.activated), self.target_activated)
            if self.method != "lora" and abs(active_dev) > 0.005:
                note.append(f"activated budget off by {active_dev:+.0%} (always-active shared part)")
        return {
            "method": self.method,
            "variant": self.variant.tag,
            "granularity": self.variant.granularity,
            **self.description,
            "total": self.counts.total,
            "activated": self.counts.activated,
            "router": self.counts.router,
            "total_vs_R": round(_deviation(self.matched(self.counts.total), self.target_total), 4),
            "activated_vs_K": round(
                _deviation(self.matched(self.counts.activated), self.target_activated), 4
            ),
            "router_mode": self.router_mode,
            "verified": self.verified_total == self.counts.total
            if self.verified_total is not None
            else None,
            "note": "; ".join(note),
            "config": self.config.to_dict(),
        }


def solve_study(
    request: BudgetRequest,
    methods: list[tuple[Method, dict[str, Any]]],
    shapes: list[TargetShape],
) -> list[BudgetRow]:
    """Every (method, variant) of the study with its config and counts.

    All infeasible requests are collected and refused together, before anything runs.
    """
    rows: list[BudgetRow] = []
    errors: list[str] = []
    target_total = lora_count(request.total_rank, shapes)
    target_active = lora_count(request.active_rank, shapes)
    for method, options in methods:
        for variant in method.plan_variants(request, options):
            try:
                config = method.solve(request, variant, shapes, options)
            except BudgetError as exc:
                errors.append(f"- {method.name} ({variant.tag}): {exc}")
                continue
            rows.append(
                BudgetRow(
                    method=method.name,
                    variant=variant,
                    config=config,
                    counts=method.count_model(config, shapes),
                    target_total=target_total,
                    target_activated=target_active,
                    dense=method.is_dense(config),
                    routed=method.routed,
                    router_mode=request.router,
                    description=method.describe(config),
                )
            )
    if errors:
        raise BudgetError("infeasible budget request:\n" + "\n".join(errors))
    return rows


def verify_counts(rows: list[BudgetRow], methods: dict[str, Method], shapes: list[TargetShape]) -> None:
    """Build each row's real layers on the ``meta`` device, one per distinct layer shape, and
    record the real trainable ``numel`` summed over all adapted layers (no weights needed)."""
    import torch

    from harness.methods.inject import trainable_numel

    by_shape: dict[tuple[int, int], int] = {}
    for s in shapes:
        by_shape[(s.d_in, s.d_out)] = by_shape.get((s.d_in, s.d_out), 0) + 1
    for row in rows:
        total = 0
        for (d_in, d_out), multiplicity in by_shape.items():
            with torch.device("meta"):
                holder = nn.Module()
                holder.linear = nn.Linear(d_in, d_out, bias=False)
                holder.requires_grad_(False)
                methods[row.method].apply(
                    holder, [TargetShape("linear", d_in, d_out)], row.config
                )
            total += multiplicity * trainable_numel(holder)
        row.verified_total = total
