"""Vectorised routing pieces shared by the routed methods (no loop over experts or tokens)."""

from __future__ import annotations

import math

import torch


def topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` experts, gates = softmax over the ``k`` selected logits: ``(index, weight)``.

    With ``k = 1`` that softmax is the constant 1 and the router would never
    receive a gradient through the output, so the selected expert's probability
    under the softmax over *all* experts is used instead (Switch Transformer's
    top-1 gate, Fedus et al. 2021).
    """
    if k == 1:
        probs = torch.softmax(logits, dim=-1)
        weight, index = probs.topk(1, dim=-1)
        return index, weight
    values, index = logits.topk(k, dim=-1)
    return index, torch.softmax(values, dim=-1)


def scatter_gate(index: torch.Tensor, weight: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``(N, k)`` selected experts and their gates -> dense ``(N, E)`` gate, zero elsewhere."""
    gate = torch.zeros(index.shape[0], n_experts, dtype=weight.dtype, device=weight.device)
    return gate.scatter(1, index, weight)


def selection_share(
    index: torch.Tensor,
    n_experts: int,
    token_mask: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of the batch's token-to-expert assignments each expert received, ``(E,)``, sums to 1.

    ``keep`` (``(N, k)`` bool) drops assignments that did not happen (capacity);
    masked tokens (padding) do not count.
    """
    valid = torch.ones_like(index, dtype=torch.bool) if keep is None else keep
    if token_mask is not None:
        valid = valid & token_mask.unsqueeze(-1)
    counts = torch.zeros(n_experts, device=index.device, dtype=torch.float32)
    counts.index_add_(0, index[valid], torch.ones(int(valid.sum()), device=index.device))
    return counts / counts.sum().clamp_min(1.0)


def soft_share(gate: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean gate per expert over real tokens, normalised to sum to 1 (dense routing)."""
    g = gate.detach().float()
    if token_mask is not None:
        g = g[token_mask]
    if g.shape[0] == 0:
        return torch.zeros(gate.shape[-1], device=gate.device)
    mean = g.mean(0)
    return mean / mean.sum().clamp_min(1e-12)


def expert_capacity(capacity_factor: float, top_k: int, n_tokens: int, n_experts: int) -> int:
    """SiRA's per-expert capacity ``ceil(cf · k · T / E)`` tokens per batch."""
    return math.ceil(capacity_factor * top_k * n_tokens / n_experts)


def capacity_keep(
    index: torch.Tensor, n_experts: int, capacity: int, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """Which assignments fit in their expert's capacity, ``(N, k)`` bool.

    Priority (as in GShard): every token's first choice before any token's second
    choice; within one choice rank, earlier tokens (flattened batch order) first.
    Masked tokens neither consume capacity nor are kept.
    """
    n, k = index.shape
    onehot = torch.nn.functional.one_hot(index, n_experts)  # (N, k, E)
    if token_mask is not None:
        onehot = onehot * token_mask.view(n, 1, 1)
    by_priority = onehot.transpose(0, 1).reshape(k * n, n_experts)  # choice rank major
    position = by_priority.cumsum(0) * by_priority  # 1-based slot in the chosen expert
    fits = (position > 0) & (position <= capacity)
    return fits.any(-1).view(k, n).transpose(0, 1)


def load_balancing_loss(
    probs: torch.Tensor, index: torch.Tensor, token_mask: torch.Tensor | None
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4), generalised to top-k:

        L_aux = E · sum_e f_e · P_e

    ``f_e``: share of assignments routed to expert ``e``; ``P_e``: mean router
    probability of ``e`` over real tokens. Equals 1 under perfect balance.
    """
    n_experts = probs.shape[-1]
    f = selection_share(index, n_experts, token_mask).to(probs.dtype)
    p = probs if token_mask is None else probs[token_mask]
    if p.shape[0] == 0:
        return probs.sum() * 0.0
    return n_experts * torch.sum(f * p.mean(0))
