"""A method plugin: top-k LoRA experts behind a frozen random router.

An ablation the built-in methods lack: does a *learned* router matter? The
experts are SiRA/MoLoRA-style rank blocks; the router is a fixed random
projection (a buffer, never trained), so it adds no trainable parameters.
"""

import torch

from harness.adapters import BlockMixtureLayer, BlockMixtureMethod, Routing, register
from harness.adapters.routing import selection_share, topk_softmax


class FrozenRouterLayer(BlockMixtureLayer):
    has_router = False  # no trainable gate: counted as zero router parameters

    def __init__(self, base_layer, config, scaling):
        super().__init__(base_layer, config, scaling)
        generator = torch.Generator().manual_seed(0)
        projection = torch.randn(config.num_experts, self.in_features, generator=generator)
        self.register_buffer("projection", projection)

    def route(self, x, token_mask):
        index, weight = topk_softmax(x @ self.projection.T, self.top_k)
        load = selection_share(index, self.num_experts, token_mask)
        return Routing(index=index, weight=weight, load=load)


@register
class FrozenRouterLoRA(BlockMixtureMethod):
    name = "frozen_router"
    description = "top-k LoRA experts chosen by a fixed random projection (no learned router)"
    paper = "ablation (this harness)"
    layer_cls = FrozenRouterLayer
