"""A method plugin with its own layer, counts and budget solver (not a block mixture).

A LoRA whose whole update is switched per token by a learned scalar gate:

    delta(x) = sigmoid(w · x) · (alpha / r) · B A x

with ``A``: ``r x d_in`` (Kaiming-uniform, as peft's A), ``B``: ``d_out x r`` (zero: an exact
no-op start) and the gate ``w``: ``d_in`` weights (zero: every gate 0.5 at first). An
ablation the built-in methods lack: does a per-token "how much adapter" decision help a
single LoRA, without experts? The gate is the router (counted in ``router``).

What it shows of the toolkit (docs/plugins.md, "experts share parts, or the layer is not a
block mixture"): an ``AdapterLayer`` with its own ``delta``, ``count`` with a router,
``solve`` meeting the budget under both router modes, ``describe``, the routing record
(``keep_routing``) and ``expert_load`` for a one-expert layer. The built-in
``methods/hydralora.py`` (shared A, E heads) and ``methods/mode.py`` are larger examples.
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
)
from harness.adapters.grid import lora_count


@dataclass
class GatedLoRAConfig(MethodConfig):
    rank: int = 8


class GatedLoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, config: GatedLoRAConfig):
        super().__init__(base_layer)
        self.scaling = config.alpha / config.rank
        self.lora_A = nn.Parameter(torch.empty(config.rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank))
        self.gate = nn.Parameter(torch.zeros(self.in_features))
        kaiming_uniform_like_peft(self.lora_A)
        self._routing: Routing | None = None
        self._mask: torch.Tensor | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).to(self.lora_A.dtype)
        g = torch.sigmoid(xf @ self.gate).unsqueeze(-1)  # (N, 1): one "expert", gated per token
        out = (g * self.scaling) * ((xf @ self.lora_A.T) @ self.lora_B.T)
        self._routing, self._mask = Routing(gate=g), self._flat_mask(xf.shape[0], x.device)
        self.keep_routing(self._routing, 1)
        return out.view(*lead, self.out_features)

    def expert_load(self) -> torch.Tensor | None:
        if self._routing is None:
            return None
        return self._routing.expert_load(1, self._mask)


def gated_counts(shape: TargetShape, rank: int) -> ParamCount:
    total = rank * (shape.d_in + shape.d_out) + shape.d_in
    return ParamCount(total=total, activated=total, router=shape.d_in)


@register
class GatedLoRA(Method):
    name = "gated_lora"
    display_name = "Gated LoRA"
    description = "one LoRA whose update is scaled per token by a learned sigmoid gate"
    paper = "ablation (this harness)"
    config_cls = GatedLoRAConfig
    routed = True
    dense = True
    sweeps_granularity = False

    def count(self, config: GatedLoRAConfig, shape: TargetShape) -> ParamCount:
        return gated_counts(shape, config.rank)

    def solve(self, request, variant, shapes, options=None) -> GatedLoRAConfig:
        """Rank ``R`` (router listed beside); under ``router: counted`` the largest rank whose
        total, gate included, stays within LoRA rank ``R``'s."""
        target = lora_count(request.total_rank, shapes)
        for rank in range(request.total_rank, 0, -1):
            config = self.configure(options, alpha=request.alpha, rank=rank)
            count = self.count_model(config, shapes)
            total = count.total if request.router == "counted" else count.total - count.router
            if total <= target:
                return config
        raise BudgetError(f"gated_lora: even rank 1 exceeds LoRA rank {request.total_rank}'s {target:,} parameters")

    def describe(self, config: GatedLoRAConfig) -> dict:
        return {"num_experts": 1, "expert_rank": config.rank, "top_k": 1}

    def make_layer(self, base: nn.Linear, config: GatedLoRAConfig) -> GatedLoRALayer:
        return GatedLoRALayer(base, config)
