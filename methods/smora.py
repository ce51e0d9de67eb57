"""SMoRA — Zhao et al. 2025, "Each Rank Could be an Expert", arXiv 2501.15103.

Every rank (more generally, every rank block of ``r`` rows) is an expert:

    s = sigmoid(W_g x)                     (one score per block)
    S = top-k of (s + b)                   (b: selection bias, never trained)
    g_j = k · s_j / sum_{i in S} s_i  for j in S,  0 elsewhere
    delta(x) = (alpha / (k·r)) · B (expand(g) ⊙ A x),   A: R x d_in, B: d_out x R

The scale ``alpha / (k·r)`` is LoRA's ``alpha / rank`` for the ``k·r = K``
active ranks: with every block active (``k = E``) and uniform scores the gates
are all 1 and SMoRA is exactly LoRA of rank ``R`` with scale ``alpha / R``.

Load balancing without an auxiliary loss (DeepSeek-V3 style): after every
optimizer step

    b_j += gamma · sign(mean_load - load_j)

with ``load_j`` the number of real tokens of the last training batch that
selected block ``j`` (gamma 1e-5 in the paper). ``b`` is a buffer: it receives
no gradient and is saved with the adapter.

With ``k = 1`` the normalised gate is the constant 1 and the router would get
no gradient, so the raw ``s_j`` is used there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.adapters import BlockMixtureLayer, BlockMixtureMethod, MixtureConfig, Routing, register
from harness.adapters.routing import selection_counts


@dataclass
class SMoRAConfig(MixtureConfig):
    bias_update_rate: float = 1e-5


class SMoRALayer(BlockMixtureLayer):
    config: SMoRAConfig

    def __init__(self, base_layer, config, scaling):
        super().__init__(base_layer, config, scaling)
        self.register_buffer("selection_bias", torch.zeros(self.num_experts))
        self._counts: torch.Tensor | None = None

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        scores = torch.sigmoid(self.router(x))
        _, index = (scores.detach() + self.selection_bias).topk(self.top_k, dim=-1)
        selected = scores.gather(1, index)
        if self.top_k > 1:
            weight = self.top_k * selected / selected.sum(-1, keepdim=True)
        else:
            weight = selected
        counts = selection_counts(index, self.num_experts, token_mask)  # real tokens per block
        if self.training:
            self._counts = counts
        return Routing(index=index, weight=weight, load=counts / counts.sum().clamp_min(1.0))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self._counts is None:
            return
        counts, self._counts = self._counts, None
        rate = self.config.bias_update_rate
        self.selection_bias += rate * torch.sign(counts.mean() - counts)


@register
class SMoRA(BlockMixtureMethod):
    name = "smora"
    display_name = "SMoRA"
    description = "each rank block is an expert: sigmoid gates, top-k with a load-balancing bias"
    paper = "Zhao et al. 2025, arXiv 2501.15103"
    config_cls = SMoRAConfig
    layer_cls = SMoRALayer

    def scaling(self, config: SMoRAConfig) -> float:
        """``alpha / (k·r)``: LoRA's scale for the ``K = k·r`` active ranks."""
        return config.alpha / (config.top_k * config.expert_rank)
