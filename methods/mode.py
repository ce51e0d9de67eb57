"""MoDE — Ning et al. 2024, "MoDE: Effective Multi-task Parameter Efficient Fine-Tuning with a
Mixture of Dyadic Experts", arXiv 2408.01505 (Findings of NAACL 2025). No public code: this
follows the paper's description.

A LoRA update is a sum of dyadic (rank-one) products ``b_j a_jᵀ``. MoDE shares the
down-projection ``A`` (``r x d_in``, rows ``a_j``) across ``n`` experts, gives each expert
``i`` its own up-projection ``B_i`` (``d_out x r``, columns ``b_{i,j}``) and routes **each
rank dimension independently** over the experts:

    delta(x) = (alpha / r) · sum_{j=1..r} sum_{i=1..n} G_j(x)_i · b_{i,j} (a_jᵀ x)
    G_j(x)   = softmax over the n experts of (W_{g,j} x),      W_{g,j}: n x d_in

so the router has ``r·n·d_in`` parameters (one ``n``-way router per rank dimension) and the
parameters saved by sharing ``A`` pay for it (the paper's "without additional parameters").

Mapping to the study's budget (``R``, ``K``, granularity ``G``):

* adapter rank ``r = R/G`` (the rank of the shared ``A`` and of every ``B_i``): the axis on
  which the paper finds a middle rank best at a fixed budget;
* ``n`` experts: the number whose total (``r·d_in + n·r·d_out``, the router listed beside
  under ``router: separate``, included under ``counted``), summed over the adapted modules,
  is closest to LoRA rank ``R``'s, within ``tolerance`` (``n = 2G - 1`` for a square module
  under ``separate``: exactly LoRA-R's total);
* ``top_k = K·G/R`` experts per rank dimension (``sparse: true``, the default): the
  activated up-projection ``k·r·d_out = K·d_out`` is LoRA rank ``K``'s; the shared ``A``
  and the router are always active (the budget table shows the deviation).

What we had to assume (the paper gives no code):

* the per-rank router is a bias-free linear map of the layer input, initialised
  normal(0, 0.02) as every router here; ``A`` Kaiming-uniform and every ``B_i`` zero (an
  exact no-op start), scale ``alpha / r`` as LoRA's;
* top-k per rank dimension with the softmax over the selected logits (top-1: the selected
  expert's full-softmax probability, so the router learns), as the harness's other top-k
  routers; ``sparse: false`` is the dense softmax over all experts;
* no auxiliary load-balancing loss (none is described).

The routing record (which experts each task used) takes each token's gates averaged over
the ``r`` rank dimensions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters import (
    AdapterLayer,
    BudgetError,
    Method,
    MethodConfig,
    ParamCount,
    Routing,
    TargetShape,
    kaiming_uniform_like_peft,
    register,
    router_init,
)
from harness.adapters.grid import lora_count, standard_grid
from harness.adapters.routing import routing_dtype, scatter_gate, topk_softmax


@dataclass
class MoDEConfig(MethodConfig):
    num_experts: int = 2
    expert_rank: int = 4
    top_k: int | None = None
    sparse: bool = True


class MoDELayer(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, config: MoDEConfig):
        super().__init__(base_layer)
        self.config = config
        self.num_experts, self.rank, self.top_k = config.num_experts, config.expert_rank, config.top_k
        self.scaling = config.alpha / config.expert_rank
        n, r = self.num_experts, self.rank
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, n * r))  # column i·r + j: b_{i,j}
        self.router = nn.Linear(self.in_features, r * n, bias=False)  # row j·n + i: rank j, expert i
        kaiming_uniform_like_peft(self.lora_A)
        router_init(self.router.weight)
        self._routing: Routing | None = None
        self._mask: torch.Tensor | None = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """``(N, r, n)``: for each token and rank dimension, the gates over the experts."""
        n, r = self.num_experts, self.rank
        logits = self.router(x).view(-1, n)  # (N·r, n)
        if self.top_k is None or self.top_k >= n:
            gate = torch.softmax(logits.to(routing_dtype(logits)), dim=-1).to(x.dtype)
        else:
            index, weight = topk_softmax(logits, self.top_k)
            gate = scatter_gate(index, weight, n).to(x.dtype)
        return gate.view(-1, r, n)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        gate = self.gates(xf)  # (N, r, n)
        h = F.linear(xf, self.lora_A)  # (N, r): a_jᵀ x, shared by every expert
        z = (gate * (h * self.scaling).unsqueeze(-1)).transpose(1, 2).flatten(1)  # (N, n·r)
        out = F.linear(z, self.lora_B)
        self._routing = Routing(gate=gate.mean(1))  # per-expert share, averaged over rank dims
        self._mask = self._flat_mask(xf.shape[0], x.device)
        self.keep_routing(self._routing, self.num_experts)
        return out.view(*lead, self.out_features)

    def expert_load(self) -> torch.Tensor | None:
        if self._routing is None:
            return None
        return self._routing.expert_load(self.num_experts, self._mask).detach()


def mode_counts(shape: TargetShape, experts: int, rank: int, top_k: int | None) -> ParamCount:
    router = rank * experts * shape.d_in
    shared = rank * shape.d_in
    per_expert = rank * shape.d_out
    active = experts if top_k is None else top_k
    return ParamCount(
        total=shared + experts * per_expert + router,
        activated=shared + active * per_expert + router,
        router=router,
    )


@register
class MoDE(Method):
    name = "mode"
    display_name = "MoDE"
    description = "shared down-projection A, per-expert up-projections, each rank dimension routed over the experts"
    paper = "Ning et al. 2024, arXiv 2408.01505 (no public code)"
    config_cls = MoDEConfig
    routed = True
    dense = False

    def count(self, config: MoDEConfig, shape: TargetShape) -> ParamCount:
        return mode_counts(shape, config.num_experts, config.expert_rank, config.top_k)

    def is_dense(self, config: MoDEConfig) -> bool:
        return config.top_k is None or config.top_k >= config.num_experts

    def solve(self, request, variant, shapes, options=None) -> MoDEConfig:
        options = dict(options or {})
        sparse = bool(options.get("sparse", True))
        _, rank, top_k = standard_grid(request, variant.granularity, need_top_k=sparse)
        target = lora_count(request.total_rank, shapes)
        counted = request.router == "counted"
        best = None
        for experts in range(max(top_k or 1, 1), 4 * variant.granularity + 2):
            config = self.configure(
                options, alpha=request.alpha, num_experts=experts, expert_rank=rank, top_k=top_k
            )
            count = self.count_model(config, shapes)
            dev = ((count.total if counted else count.total - count.router) - target) / target
            if best is None or abs(dev) < best[0]:
                best = (abs(dev), config)
        if best is None or best[0] > request.tolerance:
            closest = "none" if best is None else f"{best[1].num_experts} experts, {best[0]:.1%} off"
            raise BudgetError(
                f"mode at granularity {variant.granularity} (rank {rank}): no number of experts puts "
                f"the total within {request.tolerance:.1%} of LoRA rank {request.total_rank}'s "
                f"{target:,} parameters (closest: {closest}); raise budget.tolerance, use "
                "router: separate or another granularity"
            )
        return best[1]

    def describe(self, config: MoDEConfig) -> dict[str, Any]:
        return {
            "num_experts": config.num_experts,
            "expert_rank": config.expert_rank,
            "top_k": config.top_k if config.top_k is not None else config.num_experts,
            "routing": "per rank dimension",
        }

    def make_layer(self, base: nn.Linear, config: MoDEConfig) -> MoDELayer:
        return MoDELayer(base, config)
