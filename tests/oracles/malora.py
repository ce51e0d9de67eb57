"""MALoRA from the paper's equation (no official code to compare against).

Wang et al. 2024, "MALoRA: Mixture of Asymmetric Low-Rank Adaptation for Enhanced
Multi-Task Learning", arXiv 2410.22782 (Findings of NAACL 2025). No code was found:
the ACL Anthology page and a co-author's publication list give a paper link only, and
the GitHub repositories named "MALoRA" are unrelated student projects (see
docs/fidelity.md).

The formula, evaluated expert by expert (our module docstring states the same):

    delta(x) = sum_{e in topk(W_g x)} g_e · (alpha / r_e) · B_e P_e S x

``S`` (``r_s x d_in``) shared by all experts, ``P_e`` (``r_e x r_s``), ``B_e``
(``d_out x r_e``); ``g``: softmax over the ``k`` selected logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {"repository": "none published", "paper": "arXiv 2410.22782"}


def topk_gates(
    logits: torch.Tensor, top_k: int, *, switch_top1: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token: the ``k`` largest logits' experts and a softmax over those logits
    (``k = 1`` and ``switch_top1``: the full-softmax probability of the chosen expert)."""
    values, index = logits.topk(top_k, dim=-1)
    if top_k == 1 and switch_top1:
        return index, torch.softmax(logits, dim=-1).gather(-1, index)
    return index, torch.softmax(values, dim=-1)


def malora_delta(
    x: torch.Tensor,
    shared_S: torch.Tensor,
    expert_Ps: list[torch.Tensor],
    expert_Bs: list[torch.Tensor],
    router_weight: torch.Tensor,
    *,
    top_k: int,
    alpha: float,
    r_e: int,
    switch_top1: bool = False,
) -> torch.Tensor:
    """``sum_{e in topk} g_e (alpha / r_e) B_e P_e S x``; ``S``: ``(r_s, d_in)`` shared,
    ``P_e``: ``(r_e, r_s)``, ``B_e``: ``(d_out, r_e)``; ``x``: ``(N, d_in)``."""
    index, gates = topk_gates(F.linear(x, router_weight), top_k, switch_top1=switch_top1)
    sx = F.linear(x, shared_S)  # the shared subspace, computed once
    rows = []
    for n in range(x.shape[0]):
        out = torch.zeros(expert_Bs[0].shape[0], dtype=x.dtype)
        for j in range(top_k):
            e = int(index[n, j])
            out = out + gates[n, j] * (alpha / r_e) * (expert_Bs[e] @ (expert_Ps[e] @ sx[n]))
        rows.append(out)
    return torch.stack(rows)
