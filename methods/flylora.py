"""FlyLoRA — Zou et al. 2025, "FlyLoRA: Boosting Task Decoupling and Parameter Efficiency via
Implicit Rank-Wise Mixture-of-Experts", NeurIPS 2025; code github.com/gfyddha/FlyLoRA.

Every rank is an expert (``G = R``) and there is no router: the down-projection ``A`` is a
**frozen sparse random** matrix whose output both feeds the up-projection and selects the
experts (the "implicit router"):

    y = A x                                   A: R x d_in, frozen, p non-zeros per row
    S = top-K of (y + b)                      b: selection bias (R,), never trained
    delta(x) = (alpha / R) · B (m_S ⊙ y)      m_S: 1 on the K selected ranks, 0 elsewhere

``B`` (``d_out x R``, zero: an exact no-op start) is the only trained matrix. ``A``: each row
has ``p = d_in // (R // K)`` non-zeros at random positions, drawn from ``N(0, 1/R²)`` (the
authors' ``init_lora_weights="sparse"``). Load balancing without a loss (as SMoRA): after
every optimizer step ``b_j += u · sign(mean(c) - c_j)`` with ``c_j`` the number of real
tokens of the last training batch that selected rank ``j`` (summed over the ranks'
shards under several processes); ``u = bias_update_rate``
(default ``1e-3``, the authors' ``scripts/run_mmlu.sh``).

Source: the authors' training code, ``peft/src/peft/tuners/lora/layer.py`` of
github.com/gfyddha/FlyLoRA at commit 91d9e3672d3d2b799aea05a3046f7714e8ffb85e
(``Linear.forward`` and ``reset_lora_parameters``, the lines marked ``# modified``),
re-implemented in ``tests/oracles/flylora.py``; ``tests/test_new_methods.py`` holds this layer
against it. Differences from that code (``docs/fidelity.md``):

* ``A x`` keeps its gradient with respect to ``x`` (the authors compute it under
  ``torch.no_grad()``, so no gradient reaches the layer's input through the adapter; their
  minimal ``flylora.py`` keeps it, as here). Outputs and ``B``'s gradient are identical.
* the bias moves once per optimizer step from the real tokens of the step's last forward
  (theirs: at every forward, training or evaluation, padding included);
* selection by the signed ``y + b`` as their training code (``magnitude: true`` selects by
  ``|y + b|``, as their minimal ``flylora.py``).

Budget: ``G = R`` rank-1 experts, ``K`` active (``top_k = K``), scale ``alpha / R`` (peft's
LoRA at rank ``R``). Only ``B`` is trained, so the trainable total is ``R·d_out``, below LoRA
rank ``R``'s ``R·(d_in + d_out)`` by the frozen ``A``'s ``R·d_in`` (and the activated
``K·d_out`` below LoRA rank ``K``'s): the paper's own comparison (same rank, fewer trained
parameters), shown in the budget table. No router parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters import (
    AdapterLayer,
    BudgetError,
    Method,
    MethodConfig,
    ParamCount,
    Routing,
    TargetShape,
    Variant,
    register,
)
from harness.adapters.distributed import reduce_across_ranks
from harness.adapters.routing import routing_dtype, selection_counts

#: the authors' bias step in their MMLU script (``--bias_u 0.001``)
AUTHORS_BIAS_UPDATE_RATE = 1e-3


@dataclass
class FlyLoRAConfig(MethodConfig):
    rank: int = 8
    top_k: int = 2
    bias_update_rate: float = AUTHORS_BIAS_UPDATE_RATE
    magnitude: bool = False


def sparse_random_A(rank: int, top_k: int, d_in: int) -> torch.Tensor:
    """The authors' frozen ``A`` (``rank x d_in``, float32): per row ``p = d_in // (rank // top_k)``
    positions from ``randperm``, then every entry from ``N(0, 1/rank²)`` and the rest zeroed
    (the same draws, in the same order, as their ``reset_lora_parameters``)."""
    p = d_in // (rank // top_k)
    mask = torch.zeros(rank, d_in, dtype=torch.bool)
    for i in range(rank):
        mask[i, torch.randperm(d_in)[:p]] = True
    weight = torch.empty(rank, d_in)
    nn.init.normal_(weight, mean=0.0, std=1.0 / rank)
    return weight * mask.float()


class FlyLoRALayer(AdapterLayer):
    def __init__(self, base_layer: nn.Linear, config: FlyLoRAConfig):
        super().__init__(base_layer)
        self.config = config
        self.rank, self.top_k = config.rank, config.top_k
        self.scaling = config.alpha / config.rank
        self.register_buffer("fly_A", sparse_random_A(config.rank, config.top_k, self.in_features))
        self.register_buffer("selection_bias", torch.zeros(config.rank))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, config.rank))
        self._routing: Routing | None = None
        self._mask: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).to(self.lora_B.dtype)
        mask = self._flat_mask(xf.shape[0], x.device)
        y = F.linear(xf, self.fly_A.to(xf.dtype))  # (N, R): the implicit router and the down-projection
        score = y.detach().to(routing_dtype(y)) + self.selection_bias.to(routing_dtype(y))
        if self.config.magnitude:
            score = score.abs()
        index = score.topk(self.top_k, dim=-1).indices
        gate = torch.zeros_like(y).scatter(1, index, self.scaling)
        out = F.linear(y * gate, self.lora_B)
        self._routing = Routing(index=index, weight=torch.ones(index.shape, dtype=y.dtype, device=y.device))
        self._mask = mask
        self.keep_routing(self._routing, self.rank)
        if self.training:  # real tokens per rank, for the bias update after the step
            self._counts = selection_counts(index, self.rank, mask)
        return out.view(*lead, self.out_features)

    def expert_load(self) -> torch.Tensor | None:
        if self._routing is None:
            return None
        return self._routing.expert_load(self.rank, self._mask)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self._counts is None:
            return
        counts, self._counts = reduce_across_ranks(self._counts), None  # the global batch's
        step = torch.sign(counts.mean() - counts).to(self.selection_bias.dtype)
        self.selection_bias += self.config.bias_update_rate * step

    def extra_repr(self) -> str:
        return f"rank={self.rank}, top_k={self.top_k}, scaling={self.scaling:g}"


@register
class FlyLoRA(Method):
    name = "flylora"
    display_name = "FlyLoRA"
    description = "rank-wise experts, frozen sparse random A as implicit router, top-K ranks, no router"
    paper = "Zou et al. 2025, NeurIPS 2025 (github.com/gfyddha/FlyLoRA)"
    config_cls = FlyLoRAConfig
    routed = True
    dense = False
    sweeps_granularity = False

    def variants(self, request, options=None) -> list[Variant]:
        return [Variant(request.total_rank, f"G{request.total_rank}")]

    def count(self, config: FlyLoRAConfig, shape: TargetShape) -> ParamCount:
        return ParamCount(total=config.rank * shape.d_out, activated=config.top_k * shape.d_out, router=0)

    def solve(self, request, variant, shapes, options=None) -> FlyLoRAConfig:
        R, K = request.total_rank, request.active_rank
        if variant.granularity != R:
            raise BudgetError(f"flylora runs at G = R = {R} (rank-wise experts), not G = {variant.granularity}")
        small = [s for s in shapes if s.d_in < R // K]
        if small:
            raise BudgetError(
                f"flylora: module {small[0].name!r} has d_in {small[0].d_in} < R // K = {R // K}, "
                "so A's rows would have no non-zero entry"
            )
        return self.configure(options, alpha=request.alpha, rank=R, top_k=K)

    def describe(self, config: FlyLoRAConfig) -> dict[str, Any]:
        return {"num_experts": config.rank, "expert_rank": 1, "top_k": config.top_k, "A": "frozen sparse"}

    def budget_note(self, config: FlyLoRAConfig) -> str | None:
        return (
            "A frozen (sparse random, not trained): only B counts, R·d_out total and K·d_out "
            "activated, below LoRA's R·(d_in+d_out) and K·(d_in+d_out)"
        )

    def make_layer(self, base: nn.Linear, config: FlyLoRAConfig) -> FlyLoRALayer:
        return FlyLoRALayer(base, config)


__all__ = ["FlyLoRA", "FlyLoRAConfig", "FlyLoRALayer", "sparse_random_A"]
