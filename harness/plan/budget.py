"""The study's budget: one row per (method, variant) with its solved config and counts, and
the check of every row's analytic counts against real modules built on the ``meta`` device.

The primitives a method's ``solve`` uses (the request, the granularity grid, the
counted-router fit) are the toolkit's :mod:`harness.adapters.grid`; they are re-exported
here for the engine's readers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from harness.adapters import BudgetError, Method, MethodConfig, ParamCount, TargetShape, Variant
from harness.adapters.grid import (
    ROUTER_MODES,
    BudgetRequest,
    deviation,
    feasible_granularities,
    fit_router_counted,
    layer_positions,
    lora_count,
    nearest,
    standard_grid,
)
from harness.adapters.inject import trainable_numel

__all__ = [
    "ROUTER_MODES",
    "BudgetError",
    "BudgetRequest",
    "BudgetRow",
    "feasible_granularities",
    "fit_router_counted",
    "lora_count",
    "nearest",
    "solve_study",
    "standard_grid",
    "verify_counts",
]


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
    #: the method is the study's reference (peft's LoRA): its rows are the budget's targets
    reference_method: bool = False
    #: the method's own words for its activated budget (``Method.budget_note``)
    method_note: str | None = None
    #: ``budget.tolerance``: a total further than this from LoRA rank R's is noted
    tolerance: float = 0.05

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
        total_dev = deviation(self.matched(self.counts.total), self.target_total)
        if not self.reference_method and abs(total_dev) > self.tolerance:
            note.append(f"total budget off by {total_dev:+.0%}")
        if self.method_note:
            note.append(self.method_note)
        elif self.dense and self.routed:
            note.append("dense: every expert active, activated budget not matched")
        elif self.dense and not self.reference_method:
            note.append("dense: activated budget not matched")
        else:
            active_dev = deviation(self.matched(self.counts.activated), self.target_activated)
            if not self.reference_method and abs(active_dev) > 0.005:
                note.append(f"activated budget off by {active_dev:+.0%} (always-active shared part)")
        return {
            "method": self.method,
            "variant": self.variant.tag,
            "granularity": self.variant.granularity,
            **self.description,
            "total": self.counts.total,
            "activated": self.counts.activated,
            "router": self.counts.router,
            "total_vs_R": round(deviation(self.matched(self.counts.total), self.target_total), 4),
            "activated_vs_K": round(
                deviation(self.matched(self.counts.activated), self.target_activated), 4
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
        for variant in method.variants(request, options):
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
                    reference_method=method.is_reference,
                    method_note=method.budget_note(config),
                    tolerance=request.tolerance,
                )
            )
    if errors:
        raise BudgetError("infeasible budget request:\n" + "\n".join(errors))
    return rows


def verify_counts(rows: list[BudgetRow], methods: dict[str, Method], shapes: list[TargetShape]) -> None:
    """Build each row's real layers on the ``meta`` device, one per distinct layer shape (and
    per-depth config, for a method whose adapter varies with depth: ``Method.layer_config``),
    and record the real trainable ``numel`` summed over all adapted layers (no weights needed)."""
    positions = layer_positions(shapes)
    for row in rows:
        method = methods[row.method]
        groups: dict[tuple[int, int, str], tuple[MethodConfig, int]] = {}
        for s in shapes:
            config = method.layer_config(row.config, *positions[s.name])
            key = (s.d_in, s.d_out, repr(config))
            groups[key] = (config, groups[key][1] + 1 if key in groups else 1)
        total = 0
        for (d_in, d_out, _), (config, multiplicity) in groups.items():
            with torch.device("meta"):
                holder = nn.Module()
                holder.linear = nn.Linear(d_in, d_out, bias=False)
                holder.requires_grad_(False)
                method.apply(holder, [TargetShape("linear", d_in, d_out)], config)
            total += multiplicity * trainable_numel(holder)
        row.verified_total = total
