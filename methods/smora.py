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
selected block ``j`` (under several ranks: summed over the ranks' shards, so every rank
makes the one-process update). ``b`` is a buffer: it receives no gradient and is saved with the
adapter.

The rate ``gamma`` (``bias_update_rate``). The paper's ``1e-5`` was made for runs of tens
of thousands of steps; at 160 steps no bias can exceed ``1.6e-3``, far below the spread of
the sigmoid scores (~0.3 measured), and half of 24 rank experts end such a run unused
(docs/fidelity.md). By default (``bias_update_rate: null``) the rate keeps the paper's
*total* drift per run instead of its per-step value::

    gamma = 1e-5 · PAPER_STEPS / steps,     PAPER_STEPS = 27,669

(the optimizer steps of ``config/paper.yaml``: 147,580 items // batch 16 x 3 epochs), so
``gamma`` is exactly ``1e-5`` at the paper setting (a run given in epochs, whose step
count is known only when it trains, also gets ``1e-5``) and the drift budget
``gamma · steps = 0.277`` at any run length. ``bias_update_rate: 1e-5`` restores the
paper's form; any number sets the rate. The resolved rate is part of the run's config
(and of its id).

With ``k = 1`` the normalised gate is the constant 1 and the router would get
no gradient, so the raw ``s_j`` is used there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.adapters import BlockMixtureLayer, BlockMixtureMethod, MixtureConfig, Routing, register
from harness.adapters.distributed import reduce_across_ranks
from harness.adapters.routing import selection_counts

#: the paper's bias step, and the optimizer steps of the paper setting it was made for
PAPER_RATE = 1e-5
PAPER_STEPS = 27_669


def scaled_rate(steps: int | None) -> float:
    """The paper's total bias drift per run spread over ``steps`` optimizer steps
    (``PAPER_RATE`` when the step count is not known before training)."""
    return PAPER_RATE if not steps else PAPER_RATE * (PAPER_STEPS / steps)


@dataclass
class SMoRAConfig(MixtureConfig):
    #: ``None``: resolved from the run's steps by :func:`scaled_rate` (see the module docstring)
    bias_update_rate: float | None = None


class SMoRALayer(BlockMixtureLayer):
    config: SMoRAConfig

    def __init__(self, base_layer, config, scaling):
        super().__init__(base_layer, config, scaling)
        self.register_buffer("selection_bias", torch.zeros(self.num_experts))
        self._counts: torch.Tensor | None = None

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        scores = torch.sigmoid(self.router_logits(x))
        _, index = (scores.detach() + self.selection_bias).topk(self.top_k, dim=-1)
        selected = scores.gather(1, index)
        if self.top_k > 1:
            weight = self.top_k * selected / selected.sum(-1, keepdim=True)
        else:
            weight = selected
        if self.training:  # real tokens per block, for the bias update after the step
            self._counts = selection_counts(index, self.num_experts, token_mask)
        return Routing(index=index, weight=weight)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self._counts is None:
            return
        counts, self._counts = reduce_across_ranks(self._counts), None
        rate = self.config.bias_update_rate
        if rate is None:
            rate = PAPER_RATE  # a layer built outside a study (the study resolves the rate)
        self.selection_bias += rate * torch.sign(counts.mean() - counts)


@register
class SMoRA(BlockMixtureMethod):
    name = "smora"
    display_name = "SMoRA"
    description = "each rank block is an expert: sigmoid gates, top-k with a load-balancing bias"
    paper = "Zhao et al. 2025, arXiv 2501.15103"
    config_cls = SMoRAConfig
    layer_cls = SMoRALayer

    def prepare_options(self, options, context):
        opts = dict(options or {})
        if opts.get("bias_update_rate") is None:
            opts["bias_update_rate"] = scaled_rate(context.steps)
        return opts

    def scaling(self, config: SMoRAConfig) -> float:
        """``alpha / (k·r)``: LoRA's scale for the ``K = k·r`` active ranks."""
        return config.alpha / (config.top_k * config.expert_rank)
