"""A mixture of rank-``r`` LoRA experts as rank blocks of one rank-``E·r`` LoRA.

:class:`BlockMixtureLayer` owns the stacked matrices and runs the shared core
(:mod:`harness.adapters.core`); a method subclasses it and only says how its
router scores, selects and normalises (:meth:`BlockMixtureLayer.route`).
:class:`BlockMixtureMethod` is the matching registry entry: counting, the
budget solver's standard grid and the table description.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters.base import (
    AdapterLayer,
    Method,
    MethodConfig,
    kaiming_uniform_like_peft,
    router_init,
)
from harness.adapters.core import choose_path, dense_block_delta, sparse_block_delta
from harness.adapters.grid import ParamCount, TargetShape, fit_router_counted, standard_grid
from harness.adapters.routing import Routing


@dataclass
class MixtureConfig(MethodConfig):
    """``num_experts`` experts of rank ``expert_rank``; ``top_k`` active (``None``: all, dense).

    ``path`` selects the execution path: ``auto`` (from the measured crossover),
    ``dense`` or ``sparse``.
    """

    num_experts: int = 1
    expert_rank: int = 1
    top_k: int | None = None
    path: str = "auto"

    @property
    def total_rank(self) -> int:
        return self.num_experts * self.expert_rank


class BlockMixtureLayer(AdapterLayer):
    """``delta(x) = scaling · B (expand(g(x)) ⊙ A x)`` with ``A``: ``E·r x d_in``, ``B``: ``d_out x E·r``.

    Initialisation (as peft's LoRA): ``A`` as peft's LoRA A (Kaiming-uniform,
    ``a = sqrt 5``), ``B`` zero, so the layer starts as an exact no-op; the
    router ``W_g`` (``E x d_in``, no bias) from a normal with std 0.02.
    """

    has_router: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Linear, config: MixtureConfig, scaling: float):
        super().__init__(base_layer)
        self.config = config
        self.num_experts = config.num_experts
        self.expert_rank = config.expert_rank
        self.top_k = config.top_k
        self.scaling = scaling
        self.path = choose_path(config.path, config.num_experts, config.top_k)
        self._init_projections()
        if self.has_router:
            self.router = nn.Linear(self.in_features, self.num_experts, bias=False)
            router_init(self.router.weight)
        self._logits: torch.Tensor | None = None
        self._routing: Routing | None = None
        self._routing_mask: torch.Tensor | None = None

    def _init_projections(self) -> None:
        rank = self.num_experts * self.expert_rank
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank))
        kaiming_uniform_like_peft(self.lora_A)

    # -- what a method may override -------------------------------------------------
    def down_weight(self) -> torch.Tensor:
        """The stacked down-projection ``A`` (``E·r x d_in``)."""
        return self.lora_A

    def project_down(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.down_weight())

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(A x, W_g x)``: the router's ``E`` rows stacked under ``A``'s, one matmul
        forward and one per gradient instead of two (``None`` logits: the layer has no
        router, overrides :meth:`project_down`, whose projection is then used, or trains
        only one of the two, whose fused gradient would cost more than it saves)."""
        if not self.has_router or type(self).project_down is not BlockMixtureLayer.project_down:
            return self.project_down(x), None
        down = self.down_weight()
        if down.requires_grad != self.router.weight.requires_grad:
            # frozen experts (MoA's stage two): a fused matmul would compute their gradient too
            return F.linear(x, down), None
        h, logits = F.linear(x, torch.cat([down, self.router.weight])).split(
            [down.shape[0], self.num_experts], dim=-1
        )  # split, not two slices: its gradient is one cat
        return h, logits

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``W_g x`` for the tokens being routed: computed with ``A x`` by :meth:`project`
        on the dense path, else here."""
        logits, self._logits = self._logits, None
        return logits if logits is not None else self.router(x)

    @abstractmethod
    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        """Score, select and normalise for flat tokens ``x`` (``N x d_in``)."""

    # -- the shared computation -----------------------------------------------------
    def delta(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).to(self.lora_B.dtype)
        mask = self._flat_mask(xf.shape[0], x.device)
        h = None
        if self.path == "dense":
            h, self._logits = self.project(xf)
        try:
            routing = self.route(xf, mask)
        finally:
            self._logits = None
        self._routing, self._routing_mask = routing, mask
        self.keep_routing(routing, self.num_experts)
        if self.path == "sparse" and routing.index is not None:
            out = sparse_block_delta(
                xf,
                self.down_weight(),
                self.lora_B,
                routing.index,
                routing.weight,
                self.expert_rank,
                self.scaling,
            )
        else:
            out = dense_block_delta(
                h if h is not None else self.project_down(xf),
                routing.dense_gate(self.num_experts),
                self.lora_B,
                self.expert_rank,
                self.scaling,
            )
        return out.view(*lead, self.out_features)

    def expert_load(self) -> torch.Tensor | None:
        """The share of the last batch's routing each expert received (computed on demand:
        the training loop asks every few steps, not at every forward)."""
        if self._routing is None:
            return None
        load = self._routing.expert_load(self.num_experts, self._routing_mask)
        return None if load is None else load.detach()

    def extra_repr(self) -> str:
        return (
            f"experts={self.num_experts}, expert_rank={self.expert_rank}, top_k={self.top_k}, "
            f"scaling={self.scaling:g}, path={self.path}"
        )


def mixture_counts(
    shape: TargetShape,
    num_experts: int,
    expert_rank: int,
    top_k: int | None,
    router: bool,
    extra_total: int = 0,
    extra_router: int = 0,
) -> ParamCount:
    """Counts for stacked experts: ``E·r·(d_in + d_out)`` adapter plus ``E·d_in`` router.

    ``activated`` keeps ``top_k`` experts (all when ``None``) plus the router;
    ``extra_total`` is added to both (always-used parameters such as MultiLoRA's scales);
    ``extra_router`` is router parameters beyond the ``E x d_in`` gate (a threshold network,
    a bias), counted in all three numbers.
    """
    per_expert = expert_rank * (shape.d_in + shape.d_out)
    n_router = (num_experts * shape.d_in if router else 0) + extra_router
    active = num_experts if top_k is None else top_k
    return ParamCount(
        total=num_experts * per_expert + n_router + extra_total,
        activated=active * per_expert + n_router + extra_total,
        router=n_router,
    )


class BlockMixtureMethod(Method):
    """Registry entry for a block mixture: ``E = G`` experts of rank ``R/G``, top ``k = K·G/R``.

    A plugin that only changes the router subclasses this and
    :class:`BlockMixtureLayer`, sets ``layer_cls`` and is done.
    """

    config_cls: ClassVar[type[MixtureConfig]] = MixtureConfig
    layer_cls: ClassVar[type[BlockMixtureLayer]]
    routed = True
    dense = False

    def uses_top_k(self, options: dict[str, Any]) -> bool:
        """``True``: the solver sets ``top_k = K·G/R``; ``False``: dense (all experts active)."""
        return True

    def scaling(self, config: MixtureConfig) -> float:
        """LoRA's ``alpha / r`` with ``r`` the expert rank."""
        return config.alpha / config.expert_rank

    def count(self, config: MixtureConfig, shape: TargetShape) -> ParamCount:
        return mixture_counts(
            shape, config.num_experts, config.expert_rank, config.top_k, self.layer_cls.has_router
        )

    def solve(self, request, variant, shapes, options=None) -> MixtureConfig:
        sparse = self.uses_top_k(options or {})
        experts, rank, top_k = standard_grid(request, variant.granularity, need_top_k=sparse)
        config = self.configure(
            options,
            alpha=request.alpha,
            num_experts=experts,
            expert_rank=rank,
            top_k=top_k if sparse else None,
        )
        if request.router == "counted":
            config = fit_router_counted(self, config, request, shapes)
        return config

    def is_dense(self, config: MixtureConfig) -> bool:
        return config.top_k is None or config.top_k >= config.num_experts

    def describe(self, config: MixtureConfig) -> dict[str, Any]:
        return {
            "num_experts": config.num_experts,
            "expert_rank": config.expert_rank,
            "top_k": config.top_k if config.top_k is not None else config.num_experts,
        }

    def make_layer(self, base: nn.Linear, config: MixtureConfig) -> BlockMixtureLayer:
        return self.layer_cls(base, config, self.scaling(config))
