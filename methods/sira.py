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
    assignment_slots,
    expert_capacity,
    load_balancing_loss_from_counts,
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
        cfg, k = self.config, self.top_k
        logits = self.router_logits(x)
        index, weight = topk_softmax(logits, k)
        keep = None
        if self.training or cfg.capacity_in_eval:
            tokens = self.token_batch(token_mask)
            slots, counts = assignment_slots(index, self.num_experts, token_mask, tokens)
            capacity = tokens.memo(  # the same for every layer of this forward
                ("sira capacity", cfg.capacity_factor, k, self.num_experts),
                lambda: expert_capacity(
                    cfg.capacity_factor, k, tokens.count(x.shape[0], x.device), self.num_experts
                ).float(),
            )
            keep = slots <= capacity
            weight = weight * keep
            if self.training and cfg.aux_loss_weight > 0:
                probs = torch.softmax(logits, dim=-1)
                self._aux = cfg.aux_loss_weight * load_balancing_loss_from_counts(probs, counts, k, tokens)
        if self.training and cfg.expert_dropout > 0:
            weight = F.dropout(weight, p=cfg.expert_dropout, training=True)
        return Routing(index=index, weight=weight, keep=keep)


@register
class SiRA(BlockMixtureMethod):
    name = "sira"
    display_name = "SiRA"
    description = "sparse top-k LoRA experts with per-expert capacity, expert dropout and aux loss"
    paper = "Zhu et al. 2023, arXiv 2311.09179"
    config_cls = SiRAConfig
    layer_cls = SiRALayer
