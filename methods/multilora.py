"""MultiLoRA — Wang et al. 2023, "MultiLoRA: Democratizing LoRA for Better Multi-Task
Learning", arXiv 2311.11501.

``n`` parallel rank-``r`` LoRAs, each with a learnable scale, summed:

    delta(x) = sum_i s_i · (alpha / r) · B_i A_i x

No router: every module is used for every token (dense), so MultiLoRA matches
the total budget only. In block form the scales are one gate per block shared
by all tokens.

Initialisation (every adapter here starts as an exact no-op, and every part must learn):
``s_i = 0``, ``A_i`` Kaiming-uniform (as peft's A) and ``B_i`` Kaiming-uniform
too, following the paper's change of LoRA's initialisation. Step 0 is an exact
no-op because ``s = 0``; ``s`` receives a gradient at once (``B_i A_i x != 0``)
and ``A``, ``B`` from the first step on. ``scale_init`` and ``b_init``
(``kaiming`` or ``zeros``) are configurable; ``zeros`` for B with a zero scale
would never learn and is refused.
The scales count as adapter parameters, not as router parameters.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from harness.adapters import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    MixtureConfig,
    OptionError,
    ParamCount,
    Routing,
    TargetShape,
    kaiming_uniform_like_peft,
    mixture_counts,
    register,
)


@dataclass
class MultiLoRAConfig(MixtureConfig):
    scale_init: float = 0.0
    b_init: str = "kaiming"

    def __post_init__(self) -> None:
        if self.b_init not in ("kaiming", "zeros"):
            raise OptionError(f"multilora b_init must be 'kaiming' or 'zeros', got {self.b_init!r}")
        if self.b_init == "zeros" and self.scale_init == 0:
            raise OptionError(
                "multilora with b_init='zeros' and scale_init=0 can never learn "
                "(every gradient is zero); set scale_init to a non-zero value"
            )


class MultiLoRALayer(BlockMixtureLayer):
    has_router = False
    config: MultiLoRAConfig

    def _init_projections(self) -> None:
        super()._init_projections()
        if self.config.b_init == "kaiming":
            kaiming_uniform_like_peft(self.lora_B)
        self.scales = nn.Parameter(torch.full((self.num_experts,), float(self.config.scale_init)))

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        return Routing(gate=self.scales)


@register
class MultiLoRA(BlockMixtureMethod):
    name = "multilora"
    display_name = "MultiLoRA"
    description = "n parallel LoRAs with learnable scales s_i, summed (dense, no router)"
    paper = "Wang et al. 2023, arXiv 2311.11501"
    config_cls = MultiLoRAConfig
    layer_cls = MultiLoRALayer
    routed = False
    dense = True
    mergeable = True  # delta(x) = (sum_i s_i (alpha/r) B_i A_i) x: one fixed matrix

    def uses_top_k(self, options):
        return False

    def count(self, config: MultiLoRAConfig, shape: TargetShape) -> ParamCount:
        return mixture_counts(
            shape, config.num_experts, config.expert_rank, None, False, config.num_experts
        )
