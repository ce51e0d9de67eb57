"""A method plugin whose number of experts varies per token: AdaMoLE.

AdaMoLE — Liu & Luo 2024, "AdaMoLE: Fine-Tuning Large Language Models with Adaptive Mixture
of Low-Rank Adaptation Experts", arXiv 2405.00361. A threshold network decides, per token,
how many LoRA experts take part:

    p      = softmax(W_g x)                          (E experts, W_g: E x d_in)
    tau(x) = tau_max · sigmoid(w_t · x + b_t)        (threshold network: d_in -> 1, tau_max = 1/E)
    g_e    = (p_e - tau) · [p_e >= tau] / sum_j (p_j - tau) · [p_j >= tau]
    delta(x) = sum_e g_e · (alpha / r) · B_e A_e x

Since ``max_e p_e >= 1/E >= tau``, every token keeps at least one expert; a confident router
keeps few, an unsure one many. The weights subtract the threshold before renormalising, as
the authors' code does (github.com/zefang-liu/AdaMoLE), so the threshold network learns
through them (the step ``[p >= tau]`` itself has no gradient). Auxiliary loss: Switch's
load balancing over the experts a token activated (``aux_loss_weight``). Choices where the
paper is silent: ``w_t`` starts at zero and ``b_t`` at 0 (``tau = tau_max / 2`` at first).

What it shows of the toolkit (docs/plugins.md, "A router whose expert count varies"):

* a ``Routing`` with a dense ``gate`` *and* ``index``/``keep`` (every expert listed, ``keep``
  marking the ones a token really used), so loads, the routing record and the experts a
  token used (``RoutingRecord.experts_per_token``) count the real selections;
* router parameters beyond the ``E x d_in`` gate, counted with ``mixture_counts(...,
  extra_router=...)``;
* its auxiliary loss handed over with ``self.add_aux_loss(...)``;
* its own evaluation metric with a unit (``metrics``: a count, not a share) and its own
  budget-table note (``budget_note``): "dense" would be wrong for an adaptive router.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.adapters import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    Metric,
    MixtureConfig,
    Routing,
    mixture_counts,
    register,
)
from harness.adapters.routing import load_balancing_loss


@dataclass
class AdaMoLEConfig(MixtureConfig):
    aux_loss_weight: float = 0.01


class AdaMoLELayer(BlockMixtureLayer):
    config: AdaMoLEConfig

    def __init__(self, base_layer, config, scaling):
        super().__init__(base_layer, config, scaling)
        self.threshold = nn.Linear(self.in_features, 1)
        nn.init.zeros_(self.threshold.weight)
        nn.init.zeros_(self.threshold.bias)
        self.register_buffer("all_experts", torch.arange(self.num_experts), persistent=False)

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        probs = torch.softmax(self.router_logits(x).float(), dim=-1)
        tau = torch.sigmoid(self.threshold(x).float()) / self.num_experts  # (N, 1)
        keep = probs >= tau
        kept = (probs - tau) * keep
        total = kept.sum(-1, keepdim=True)
        gate = kept / torch.where(total > 0, total, torch.ones_like(total))
        index = self.all_experts.expand(x.shape[0], -1)
        if self.training and self.config.aux_loss_weight > 0:
            self.add_aux_loss(self.config.aux_loss_weight * load_balancing_loss(probs, index, token_mask, keep))
        return Routing(gate=gate.to(x.dtype), index=index, keep=keep)


@register
class AdaMoLE(BlockMixtureMethod):
    name = "adamole"
    display_name = "AdaMoLE"
    description = "LoRA experts with a per-token threshold: each token uses as many experts as its router needs"
    paper = "Liu & Luo 2024, arXiv 2405.00361"
    config_cls = AdaMoLEConfig
    layer_cls = AdaMoLELayer
    metrics = (Metric("active_experts", "experts/token", unit="count", higher_is_better=None, decimals=2),)

    def uses_top_k(self, options) -> bool:
        return False  # the threshold, not a fixed k, decides

    def count(self, config: AdaMoLEConfig, shape):
        # the threshold network (d_in weights and a bias) is part of the router
        return mixture_counts(shape, config.num_experts, config.expert_rank, None, True,
                              extra_router=shape.d_in + 1)

    def budget_note(self, config: AdaMoLEConfig) -> str:
        return (f"adaptive: 1 to {config.num_experts} experts a token (threshold router); "
                "activated counted as all")

    def evaluation_metrics(self, config: AdaMoLEConfig, routing) -> dict:
        """``active_experts``: the experts a token was routed to, averaged over the scored
        sequences and the adapted modules."""
        value = routing.experts_per_token()
        return {"active_experts": None if value is None else round(value, 4)}
