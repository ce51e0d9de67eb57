"""HydraLoRA — Tian et al. 2024, "HydraLoRA: An Asymmetric LoRA Architecture for Efficient
Fine-Tuning", arXiv 2404.19245: one shared down-projection ``A`` and ``E`` up-projection
heads ``B_e``, mixed per token by a router:

    delta(x) = (alpha / r) · sum_e g_e(x) · B_e A x,    g = softmax(W_g x)

with ``A``: ``r x d_in`` (Kaiming-uniform, as peft's A), ``B_e``: ``d_out x r`` (zero: an
exact no-op start) and ``W_g``: ``E x d_in`` (normal, std 0.02). Every head is used for
every token (the paper's dense mixture), so the activated budget cannot be matched.

Budget (``solve``): ``E = G`` heads; the rank ``r`` is the one whose total
``r·d_in + E·r·d_out`` (router excluded under ``router: separate``, included under
``counted``), summed over the adapted layers, is nearest LoRA rank ``R``'s total (the
smaller rank on a tie). Ranks are whole, so with many heads the nearest can be well off
(R = 24, G = 24 on SmolLM2: rank 2, +6%; rank 1 would be −47%); the budget table's note
shows the gap.

Source: github.com/Clin0212/HydraLoRA (``HydraLoRA/peft/tuners/lora.py``, ``Linear.forward``);
``tests/test_oracles.py`` holds this layer against a re-implementation of that forward
(``tests/oracles/hydralora.py``). Differences from the authors' code: the router is
initialised normal(0.02) (theirs: Kaiming-uniform) and the softmax is taken in the
adapter's dtype (theirs: float32, cast back); neither changes the function computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
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
from harness.adapters.grid import lora_count


@dataclass
class HydraConfig(MethodConfig):
    heads: int = 2
    rank: int = 8


class HydraLayer(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, config: HydraConfig):
        super().__init__(base_layer)
        self.heads, self.rank = config.heads, config.rank
        self.scaling = config.alpha / config.rank
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(config.heads, self.out_features, config.rank))
        self.router = nn.Linear(self.in_features, config.heads, bias=False)
        kaiming_uniform_like_peft(self.lora_A)
        router_init(self.router.weight)
        self._routing: Routing | None = None
        self._mask: torch.Tensor | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        gate = torch.softmax(self.router(xf), dim=-1)  # (N, E)
        h = xf @ self.lora_A.T  # (N, r), shared by every head
        out = torch.einsum("ne,eor,nr->no", gate, self.lora_B, h) * self.scaling
        # the token mask: padding must not count in the load statistics
        self._routing, self._mask = Routing(gate=gate), self._flat_mask(xf.shape[0], x.device)
        self.keep_routing(self._routing, self.heads)  # the evaluation's per-task record
        return out.view(*lead, self.out_features)

    def expert_load(self) -> torch.Tensor | None:
        if self._routing is None:
            return None
        return self._routing.expert_load(self.heads, self._mask)


def hydra_counts(shape: TargetShape, heads: int, rank: int) -> ParamCount:
    router = heads * shape.d_in
    total = rank * shape.d_in + heads * rank * shape.d_out + router
    return ParamCount(total=total, activated=total, router=router)


@register
class HydraLoRA(Method):
    name = "hydralora"
    display_name = "HydraLoRA"
    description = "one shared A, E up-projection heads B_e mixed per token by a softmax router"
    paper = "Tian et al. 2024, arXiv 2404.19245"
    config_cls = HydraConfig
    routed = True
    dense = True

    def count(self, config: HydraConfig, shape: TargetShape) -> ParamCount:
        return hydra_counts(shape, config.heads, config.rank)

    def solve(self, request, variant, shapes, options=None) -> HydraConfig:
        heads = variant.granularity
        target = lora_count(request.total_rank, shapes)
        best, best_gap = None, None
        for rank in range(1, request.total_rank + 1):
            config = self.configure(options, alpha=request.alpha, heads=heads, rank=rank)
            count = self.count_model(config, shapes)
            total = count.total if request.router == "counted" else count.total - count.router
            gap = abs(total - target)
            if best_gap is None or gap < best_gap:
                best, best_gap = config, gap
        if best_gap > target:
            raise BudgetError(
                f"hydralora with {heads} heads: even rank 1 is more than twice LoRA rank "
                f"{request.total_rank}'s {target:,} parameters; use fewer heads"
            )
        return best

    def describe(self, config: HydraConfig) -> dict:
        return {"num_experts": config.heads, "expert_rank": config.rank, "top_k": config.heads}

    def make_layer(self, base: nn.Linear, config: HydraConfig) -> HydraLayer:
        return HydraLayer(base, config)
