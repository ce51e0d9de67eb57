"""SiRA — Zhu et al. 2023, "Sparse Mixture of Low Rank Adaptation", arXiv 2311.09179.

    delta(x) = sum_{e in topk(W_g x)} d(g_e) · (alpha / r) · B_e A_e x,
    g = softmax over the k selected logits,  d = expert dropout (training only)

* **Capacity**: each expert takes at most ``C = ceil(cf · k · T / E)`` tokens
  per batch (``T`` real tokens); an assignment past capacity skips that expert
  (its gate is zeroed, the others are not renormalised). Priority: all first
  choices before any second choice, earlier tokens first (GShard's order).
* **Expert dropout**: dropout with rate ``expert_dropout`` on the gate output,
  inverted scaling (``torch.nn.functional.dropout``), active only in training.
* **Auxiliary loss** (optional): Switch Transformer's load-balancing loss
  ``E · sum_e f_e P_e`` times ``aux_loss_weight``.

Choices where the paper is silent (configurable): capacity is applied in
training only (``capacity_in_eval: false``), so an evaluated token's output never
depends on the other tokens in its batch; padding consumes no capacity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.adapters import BlockMixtureLayer, BlockMixtureMethod, MixtureConfig, Routing, register
from harness.adapters.routing import (
    capacity_keep,
    expert_capacity,
    load_balancing_loss,
    real_tokens,
    topk_softmax,
)


@dataclass
class SiRAConfig(MixtureConfig):
    capacity_factor: float = 1.25
    expert_dropout: float = 0.1
    aux_loss_weight: float = 0.01
    capacity_in_eval: bool = False


class SiRALayer(BlockMixtureLayer):
    config: SiRAConfig

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        cfg = self.config
        logits = self.router(x)
        index, weight = topk_softmax(logits, self.top_k)
        keep = None
        if self.training or cfg.capacity_in_eval:
            n_tokens = real_tokens(x.shape[0], token_mask, x.device)
            capacity = expert_capacity(cfg.capacity_factor, self.top_k, n_tokens, self.num_experts)
            keep = capacity_keep(index, self.num_experts, capacity, token_mask)
            weight = weight * keep
        if self.training and cfg.expert_dropout > 0:
            weight = F.dropout(weight, p=cfg.expert_dropout, training=True)
        if self.training and cfg.aux_loss_weight > 0:
            probs = torch.softmax(logits, dim=-1)
            self._aux = cfg.aux_loss_weight * load_balancing_loss(probs, index, token_mask)
        return Routing(index=index, weight=weight, keep=keep)


@register
class SiRA(BlockMixtureMethod):
    name = "sira"
    display_name = "SiRA"
    description = "sparse top-k LoRA experts with per-expert capacity, expert dropout and aux loss"
    paper = "Zhu et al. 2023, arXiv 2311.09179"
    config_cls = SiRAConfig
    layer_cls = SiRALayer
