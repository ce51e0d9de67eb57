"""MoLA — Gao et al. 2024, "Higher Layers Need More LoRA Experts", arXiv 2402.08562; code
github.com/GCYZSL/MoLA (``src/mola_lora_hacked.py``: ``Linear_MoE.forward``; the per-layer
``number_experts`` / ``top_k`` lists of ``mola_training.py``).

Top-k routed LoRA experts whose **number varies with depth**: the adapted decoder layers are
cut into four groups, lowest to highest, and group ``j`` has ``E_j`` experts, more in
higher layers. The paper's best allocation on 32-layer LLaMA-2 is "2-4-6-8" (8 layers per
group), rank-8 experts, top-2:

    p = softmax(W_g x)  over the layer's E_j experts;   S = top-k of p
    delta(x) = sum_{e in S} (p_e / sum_{s in S} p_s) · (alpha / r) · B_e A_e x

(the authors' forward: softmax over all experts, top-k, renormalised, i.e. the softmax over
the selected logits).

Mapping to the study's budget (``R``, ``K``, granularity ``G``): experts of rank ``r = R/G``,
``k = K·G/R`` active (LoRA rank ``K``'s activated up- and down-projections), and per group
a whole number of experts in the ratio of ``allocation`` (default ``[2, 4, 6, 8]``, the
paper's) whose sum over the adapted layers is as close as possible to ``G`` per layer:
``sum over layers of E_layer · r = number of layers · R``, within ``budget.tolerance`` (the
uniform mixture's total, i.e. LoRA rank ``R``'s). Layer at position ``p`` of ``L`` adapted
layers is in group ``p · 4 // L`` (the paper's 8-8-8-8 split for 32 layers; a group with no
adapted layer, when fewer than four are adapted, gets 0 experts and is unused). Each group has at least ``k``
experts. Under ``router: counted`` the expert rank shrinks until the total fits.

The toolkit carries the depth through ``Method.layer_config`` (each adapted module gets
its own layer's config; counts and the real-``numel`` check sum over the layers). The
budget table shows the allocation as ``experts_per_layer`` (e.g. ``2-5-7-10``) and the
per-layer mean ``G`` in the experts column.

Choices where the paper is silent or that the harness needs: ``top_k`` from the budget
(``K·G/R``; the paper's top-2 is ``K·G/R = 2``, e.g. ``R = 24, K = 4, G = 12``); no
auxiliary loss (the authors' ``obalance`` is off by default); router normal(0, 0.02), ``A``
Kaiming-uniform, ``B`` zero, scale ``alpha / r``; with ``k = 1`` the gate is the selected
expert's full-softmax probability (so the router learns; the authors' renormalised top-1
gate is the constant 1).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field

import torch

from harness.adapters import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    BudgetError,
    MixtureConfig,
    OptionError,
    ParamCount,
    Routing,
    TargetShape,
    register,
)
from harness.adapters.grid import layer_positions, lora_count, standard_grid
from harness.adapters.routing import topk_softmax

PAPER_ALLOCATION = (2, 4, 6, 8)


@dataclass
class MoLAConfig(MixtureConfig):
    """``num_experts``: the per-layer mean (a study's config) or one layer's count (a config
    resolved by :meth:`MoLA.layer_config`, whose ``experts_per_group`` is ``None``)."""

    allocation: list[int] = field(default_factory=lambda: list(PAPER_ALLOCATION))
    experts_per_group: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.allocation or any(not isinstance(a, int) or a < 1 for a in self.allocation):
            raise OptionError(f"mola allocation must be a list of positive integers, got {self.allocation!r}")
        if self.experts_per_group is not None and len(self.experts_per_group) != len(self.allocation):
            raise OptionError(
                f"mola experts_per_group {self.experts_per_group!r} needs one count per group of "
                f"allocation {self.allocation!r}"
            )


def group_of(layer: int, layers: int, groups: int) -> int:
    """The depth group of the ``layer``-th of ``layers`` adapted layers (0 = lowest)."""
    return layer * groups // layers


class MoLALayer(BlockMixtureLayer):
    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        index, weight = topk_softmax(self.router_logits(x), self.top_k)
        return Routing(index=index, weight=weight)


@register
class MoLA(BlockMixtureMethod):
    name = "mola"
    display_name = "MoLA"
    description = "top-k LoRA experts, more experts in higher layers (the paper's 2-4-6-8 allocation)"
    paper = "Gao et al. 2024, arXiv 2402.08562 (github.com/GCYZSL/MoLA)"
    config_cls = MoLAConfig
    layer_cls = MoLALayer

    def layer_config(self, config: MoLAConfig, layer: int, layers: int) -> MoLAConfig:
        if config.experts_per_group is None:
            return config  # already one layer's
        group = group_of(layer, layers, len(config.allocation))
        return dataclasses.replace(config, num_experts=config.experts_per_group[group], experts_per_group=None)

    def count(self, config: MoLAConfig, shape: TargetShape) -> ParamCount:
        # a study's config counted for a lone module: the lowest group's layer (as ``apply``)
        return super().count(self.layer_config(config, 0, 1), shape)

    def solve(self, request, variant, shapes, options=None) -> MoLAConfig:
        options = dict(options or {})
        allocation = list(options.get("allocation", PAPER_ALLOCATION))
        experts, rank, top_k = standard_grid(request, variant.granularity)
        positions = layer_positions(shapes)
        layers = next(iter(positions.values()))[1] if positions else 1
        sizes = [0] * len(allocation)
        for p in range(layers):
            sizes[group_of(p, layers, len(allocation))] += 1
        scale = layers * experts / sum(n * w for n, w in zip(sizes, allocation))
        choices, ideals = [], [scale * w for w in allocation]
        for n, w in zip(sizes, allocation):
            ideal = scale * w
            options_j = {max(top_k, math.floor(ideal)), max(top_k, math.ceil(ideal))}
            choices.append(sorted(options_j) if n else [0])  # a group with no adapted layer: unused
        target = lora_count(request.total_rank, shapes)
        counted = request.router == "counted"
        best = None
        for r in range(rank, 0, -1) if counted else (rank,):
            for combo in itertools.product(*choices):
                config = self.configure(
                    options, alpha=request.alpha, num_experts=experts, expert_rank=r, top_k=top_k,
                    experts_per_group=list(combo),
                )
                count = self.count_model(config, shapes)
                dev = ((count.total if counted else count.total - count.router) - target) / target
                # within tolerance first, then the largest rank, the closest to the ratio, the closest total
                off_ratio = sum(abs(e - i) for e, i, n in zip(combo, ideals, sizes) if n)
                key = (abs(dev) <= request.tolerance, r, -round(off_ratio, 9), -abs(dev))
                if best is None or key > best[0]:
                    best = (key, config, dev)
        if not best[0][0]:
            raise BudgetError(
                f"mola at granularity {variant.granularity}: no whole number of experts per layer "
                f"group in the ratio {'-'.join(map(str, allocation))} puts the total within "
                f"{request.tolerance:.1%} of LoRA rank {request.total_rank}'s {target:,} parameters "
                f"(closest: {'-'.join(map(str, best[1].experts_per_group))}, {best[2]:+.1%}); "
                "raise budget.tolerance or choose another granularity"
            )
        return best[1]

    def describe(self, config: MoLAConfig):
        per_group = config.experts_per_group or [config.num_experts]
        return {**super().describe(config), "experts_per_layer": "-".join(map(str, per_group))}
