"""GOAT — Fan et al. 2025, "Make LoRA Great Again: Boosting LoRA with Adaptive Singular Values
and Mixture-of-Experts Optimization Alignment", ICML 2025, arXiv 2502.16894; code
github.com/Facico/GOAT-PEFT.

Top-k routed LoRA experts whose initial weights are **segments of the base weight's SVD**:
with ``W0 = U S Vᵀ`` (``m = min(d_in, d_out)`` singular values, descending) cut into ``E``
equal segments of ``m // E``, expert ``e`` takes the first ``r`` components of segment ``e``
(indices ``e·(m // E) .. e·(m // E) + r - 1``) and

    A_e = diag(sqrt(S_e / (s·rho))) V_eᵀ,     B_e = U_e diag(sqrt(S_e / (s·rho)))
    p = softmax(W_g x),  S = top-k of p,  w_e = p_e / sum_{i in S} p_i
    delta(x) = sum_{e in S} w_e · s · B_e A_e x,       s = alpha / r   (the scaling rule)

with ``rho = 10`` and ``s = alpha / r`` (``r = R/E`` the expert rank): the authors' shipped
configuration (``lora=src.goat``: ``init_type="goat"``, ``init_cof = 1/E``, no ``SCALING``
override). Option ``scaling_rule: eta`` gives the paper's ``s = sqrt(3·eta·d_in / r)``
(their code applies it to init types containing ``"scale"``, none of which is the ``"goat"``
segment init, so it was not run with GOAT there). The Switch load-balancing loss of the authors,
``E · sum_e (c_e / N) · P_e`` (``c_e``: tokens that selected ``e``, summed over the ``k``
choices; ``P_e``: mean router probability), times ``aux_loss_weight`` (default ``1e-3``, every
script of theirs), is added in training.

**The start (where this differs from the authors' code).** Their init subtracts
``init_cof · s · B A`` (all experts, ``init_cof = 1/E``) from the *frozen base weight*, which
leaves the model at step 0 different from the base model whenever the gates are not uniform
over all experts. The harness requires step 0 to be the base model's output, and the base
weight stays untouched here. Instead each layer keeps frozen copies ``A_e⁰, B_e⁰`` of the SVD
init (buffers, saved with the adapter) and subtracts the routed initial output:

    delta(x) = sum_{e in S} w_e · s · (B_e A_e - B_e⁰ A_e⁰) x

an exact no-op at step 0 with the authors' experts, router, scaling and loss. What changes:
the correction follows the routing (theirs: a fixed ``s/E · sum_e B_e⁰ A_e⁰``), so at step 0
the router gets no gradient from the task loss (only from the balancing loss); ``A``'s and
``B``'s gradients at step 0 are the authors' exactly. With ``k = 1`` the gate is the selected
expert's full-softmax probability (as MoLA and the toolkit's ``topk_softmax``; the authors'
renormalised top-1 gate is the constant 1, so their router learns from the balancing loss
only). No dropout (theirs: 0.05). ``tests/test_new_methods.py`` holds the init, forward and
loss against a re-implementation of the authors' layer (``tests/oracles/goat.py``).

Budget: the standard grid, ``E = G`` experts of rank ``R/G``, top ``k = K·G/R``, router
``E x d_in`` separate or counted. Every adapted module must give each expert its own
segment, ``m // E >= r`` (the solver refuses otherwise;
the authors' code would give experts overlapping segments).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from harness.adapters import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    BudgetError,
    MixtureConfig,
    OptionError,
    Routing,
    register,
)
from harness.adapters.core import dense_block_delta
from harness.adapters.routing import load_balancing_loss, routing_dtype, topk_softmax

#: the authors' ``rho`` (``GOATLayer.update_layer``) and balancing-loss weight (every script)
AUTHORS_RHO = 10.0
AUTHORS_AUX = 1e-3
SCALING_RULES = ("alpha", "eta")


@dataclass
class GOATConfig(MixtureConfig):
    aux_loss_weight: float = AUTHORS_AUX
    rho: float = AUTHORS_RHO
    #: ``alpha``: s = alpha / r (the authors' scripts); ``eta``: s = sqrt(3·eta·d_in / r)
    scaling_rule: str = "alpha"
    eta: float = 1.0

    def __post_init__(self) -> None:
        if self.path == "sparse":
            raise OptionError(
                "goat_moe computes its delta on the dense path only (the start correction needs "
                "every token's full gate); use path: auto or dense"
            )
        if self.scaling_rule not in SCALING_RULES:
            raise OptionError(
                f"goat_moe scaling_rule must be one of {', '.join(SCALING_RULES)}, got {self.scaling_rule!r}"
            )


def goat_segments(weight: torch.Tensor, experts: int, rank: int, rho: float, scaling: float):
    """The authors' ``init_type="goat"``: ``(A, B)`` stacked (``E·r x d_in``, ``d_out x E·r``)
    from the SVD of ``weight`` (``d_out x d_in``, computed in float32)."""
    U, S, Vh = torch.linalg.svd(weight.detach().float(), full_matrices=False)
    seg = S.shape[0] // experts
    idx = torch.cat([torch.arange(e * seg, e * seg + rank) for e in range(experts)])
    root = torch.sqrt(S[idx] / (scaling * rho))
    return root.unsqueeze(1) * Vh[idx], U[:, idx] * root.unsqueeze(0)


def check_segments(d_in: int, d_out: int, experts: int, rank: int, name: str = "layer") -> None:
    """Raise :class:`BudgetError` unless the ``m = min(d_in, d_out)`` singular values give each
    of the ``experts`` its own segment of at least ``rank`` components (``m // E >= r``)."""
    m = min(d_in, d_out)
    if m // experts < rank:
        raise BudgetError(
            f"goat_moe: module {name!r} ({d_in} -> {d_out}) has {m} singular values, too few for "
            f"{experts} disjoint segments of rank-{rank} experts (m // E >= r is needed)"
        )


class GOATLayer(BlockMixtureLayer):
    config: GOATConfig

    def _init_projections(self) -> None:
        E, r = self.num_experts, self.expert_rank
        check_segments(self.in_features, self.out_features, E, r)
        A, B = goat_segments(self.base_layer.weight, E, r, self.config.rho, self.scaling)
        self.lora_A = torch.nn.Parameter(A.clone())
        self.lora_B = torch.nn.Parameter(B.clone())
        self.register_buffer("goat_A0", A.clone())
        self.register_buffer("goat_B0", B.clone())

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        logits = self.router_logits(x)
        index, weight = topk_softmax(logits, self.top_k)
        if self.training and self.config.aux_loss_weight > 0:
            probs = torch.softmax(logits.to(routing_dtype(logits)), dim=-1)
            # the authors' fractions c_e / N sum to k: k times the toolkit's shares
            loss = load_balancing_loss(probs, index, token_mask)
            self.add_aux_loss(self.config.aux_loss_weight * self.top_k * loss)
        return Routing(index=index, weight=weight)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s · B (g ⊙ A x) - s · B⁰ (g ⊙ A⁰ x)``, computed as
        ``s · (B - B⁰)(g ⊙ A x) + s · B⁰ (g ⊙ (A - A⁰) x)``: exactly zero while the weights
        equal their start, and no cancellation of two large terms under bf16 (dense path only)."""
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.in_features).to(self.lora_B.dtype)
        mask = self._flat_mask(xf.shape[0], x.device)
        routing = self.route(xf, mask)
        self._routing, self._routing_mask = routing, mask
        self.keep_routing(routing, self.num_experts)
        gate = routing.dense_gate(self.num_experts)
        r, s = self.expert_rank, self.scaling
        A0, B0 = self.goat_A0.to(self.lora_A.dtype), self.goat_B0.to(self.lora_B.dtype)
        out = dense_block_delta(F.linear(xf, self.lora_A), gate, self.lora_B - B0, r, s)
        start = dense_block_delta(F.linear(xf, self.lora_A - A0), gate, B0, r, s)
        return (out + start).view(*lead, self.out_features)


@register
class GOAT(BlockMixtureMethod):
    name = "goat_moe"
    display_name = "GOAT"
    description = "top-k LoRA experts initialised from SVD segments of W0, with GOAT's scaling"
    paper = "Fan et al. 2025, ICML 2025, arXiv 2502.16894 (github.com/Facico/GOAT-PEFT)"
    config_cls = GOATConfig
    layer_cls = GOATLayer

    def scaling(self, config: GOATConfig) -> float:
        if config.scaling_rule == "eta":
            raise OptionError(
                "goat_moe scaling_rule 'eta' depends on each module's d_in; it is resolved per layer"
            )
        return config.alpha / config.expert_rank

    def make_layer(self, base, config: GOATConfig) -> GOATLayer:
        if config.scaling_rule == "eta":
            s = math.sqrt(3 * config.eta * base.in_features / config.expert_rank)
        else:
            s = self.scaling(config)
        return self.layer_cls(base, config, s)

    def solve(self, request, variant, shapes, options=None) -> GOATConfig:
        config = super().solve(request, variant, shapes, options)
        for s in shapes:
            check_segments(s.d_in, s.d_out, config.num_experts, config.expert_rank, s.name)
        return config


__all__ = ["GOAT", "GOATConfig", "GOATLayer", "goat_segments"]
