"""MoLoRA — Zadouri et al. 2023, "Pushing Mixture of Experts to the Limit", arXiv 2309.05444.

    delta(x) = sum_e p_e(x) · (alpha / r) · B_e A_e x,     p = softmax(W_g x)   over all E experts

This is the paper's soft merging: every expert is used for every token, so the
method is dense and cannot match the activated budget (tables say so).

Choices where the paper is silent or that later papers changed (all configurable):

* ``sparse: true`` gives the sparse form later papers call MoLoRA: top-``k``
  experts with the softmax taken over the selected logits only (for ``k = 1``
  the selected expert's full-softmax probability, else the router could not
  learn); ``k = K·G/R`` comes from the budget solver.
* Scaling ``alpha / r`` with ``r`` the expert rank, as each expert is a LoRA.
* Router ``W_g`` without bias, normal(0, 0.02); the router reads the layer input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.adapters import BlockMixtureLayer, BlockMixtureMethod, MixtureConfig, Routing, register
from harness.adapters.routing import topk_softmax


@dataclass
class MoLoRAConfig(MixtureConfig):
    sparse: bool = False


class MoLoRALayer(BlockMixtureLayer):
    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        logits = self.router_logits(x)
        if self.top_k is None:
            return Routing(gate=torch.softmax(logits, dim=-1))
        index, weight = topk_softmax(logits, self.top_k)
        return Routing(index=index, weight=weight)


@register
class MoLoRA(BlockMixtureMethod):
    name = "molora"
    display_name = "MoLoRA"
    description = "soft mixture of LoRA experts, p = softmax(W_g x) over all experts (top-k optional)"
    paper = "Zadouri et al. 2023, arXiv 2309.05444"
    config_cls = MoLoRAConfig
    layer_cls = MoLoRALayer

    def uses_top_k(self, options):
        return bool(options.get("sparse", False))
