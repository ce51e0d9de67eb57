"""MALoRA — Wang et al. 2024, "MALoRA: Mixture of Asymmetric Low-Rank Adaptation for Enhanced
Multi-Task Learning", arXiv 2410.22782.

The experts' down-projections share one subspace: expert ``e``'s A is ``P_e S``.

    delta(x) = sum_{e in topk} g_e · (alpha / r_e) · B_e P_e S x

* ``S``: ``r_s x d_in``, shared by all experts (always active);
* ``P_e``: ``r_e x r_s``, one small coefficient matrix per expert;
* ``B_e``: ``d_out x r_e``, per expert;
* router ``W_g`` (``E x d_in``), top-``k`` softmax (top-1: the chosen expert's
  full-softmax probability, so the router learns).

In block form the stacked down-projection is ``P S`` with ``P``
(``E·r_e x r_s``) stacking the ``P_e``: the dense path computes ``P (S x)``
(two thin matmuls), the sparse path gathers rows of ``P S``.

Budget (where the paper leaves the choice open): the parameters saved by
sharing ``S`` are spent on a larger expert rank. For each granularity the
solver picks the largest expert rank ``r_e >= R/G`` (never below the plain
mixture's) and a shared rank ``r_e <= r_s <= R`` (an expert's rank cannot
exceed the subspace it draws from) whose total, summed over all adapted
layers (router included under ``router: counted``), is within ``tolerance`` of
LoRA rank ``R``'s, closest to it. ``shared_rank`` fixes ``r_s`` instead.
Because ``S`` is always active, MALoRA's activated count is larger than the
plain mixture's at the same top-k; the tables show it.

Initialisation: ``S`` and every ``P_e`` Kaiming-uniform (``a = sqrt 5``, as
peft's A), ``B_e`` zero (exact no-op start), router normal(0, 0.02).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    BudgetError,
    MixtureConfig,
    ParamCount,
    Routing,
    TargetShape,
    kaiming_uniform_like_peft,
    register,
)
from harness.adapters.grid import lora_count, standard_grid
from harness.adapters.routing import topk_softmax


@dataclass
class MALoRAConfig(MixtureConfig):
    shared_rank: int | None = None


class MALoRALayer(BlockMixtureLayer):
    config: MALoRAConfig

    def _init_projections(self) -> None:
        r_s = self.config.shared_rank
        self.shared_S = nn.Parameter(torch.empty(r_s, self.in_features))
        self.shared_P = nn.Parameter(torch.empty(self.num_experts * self.expert_rank, r_s))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.num_experts * self.expert_rank))
        kaiming_uniform_like_peft(self.shared_S)
        kaiming_uniform_like_peft(self.shared_P)

    def down_weight(self) -> torch.Tensor:
        return self.shared_P @ self.shared_S

    def project_down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.shared_S), self.shared_P)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P S x, W_g x)``: the router's rows stacked under ``S``'s, one matmul."""
        z, logits = F.linear(x, torch.cat([self.shared_S, self.router.weight])).split(
            [self.shared_S.shape[0], self.num_experts], dim=-1
        )
        return F.linear(z, self.shared_P), logits

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        index, weight = topk_softmax(self.router_logits(x), self.top_k)
        return Routing(index=index, weight=weight)


def malora_counts(shape: TargetShape, experts: int, expert_rank: int, shared_rank: int, top_k: int) -> ParamCount:
    router = experts * shape.d_in
    shared = shared_rank * shape.d_in
    per_expert = expert_rank * (shared_rank + shape.d_out)
    return ParamCount(
        total=shared + experts * per_expert + router,
        activated=shared + top_k * per_expert + router,
        router=router,
    )


@register
class MALoRA(BlockMixtureMethod):
    name = "malora"
    display_name = "MALoRA"
    description = "experts share one down-projection subspace S (A_e = P_e S); savings go to expert rank"
    paper = "Wang et al. 2024, arXiv 2410.22782"
    config_cls = MALoRAConfig
    layer_cls = MALoRALayer

    def count(self, config: MALoRAConfig, shape: TargetShape) -> ParamCount:
        return malora_counts(shape, config.num_experts, config.expert_rank, config.shared_rank, config.top_k)

    def describe(self, config: MALoRAConfig):
        return {**super().describe(config), "shared_rank": config.shared_rank}

    def solve(self, request, variant, shapes, options=None) -> MALoRAConfig:
        options = dict(options or {})
        fixed_shared = options.pop("shared_rank", None)
        experts, base_rank, top_k = standard_grid(request, variant.granularity)
        target = lora_count(request.total_rank, shapes)
        counted = request.router == "counted"
        best = None
        shared_choices = [fixed_shared] if fixed_shared else range(1, request.total_rank + 1)
        for shared in shared_choices:
            for rank in range(base_rank, shared + 1):
                config = self.configure(
                    options, alpha=request.alpha, num_experts=experts, expert_rank=rank,
                    top_k=top_k, shared_rank=shared,
                )
                count = self.count_model(config, shapes)
                total = count.total if counted else count.total - count.router
                dev = (total - target) / target
                if abs(dev) <= request.tolerance:
                    key = (rank, -abs(dev))
                    if best is None or key > best[0]:
                        best = (key, config)
        if best is None:
            raise BudgetError(
                f"malora at granularity {variant.granularity}: no shared rank r_s (1..{request.total_rank}) "
                f"and expert rank r_e (>= R/G = {base_rank}, <= r_s) put the total within "
                f"{request.tolerance:.1%} of LoRA rank {request.total_rank}'s {target:,} parameters; "
                "raise budget.tolerance or set options.shared_rank"
            )
        return best[1]


__all__ = ["MALoRA", "MALoRAConfig", "MALoRALayer"]
