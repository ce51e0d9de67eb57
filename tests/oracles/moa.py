"""MoA (Mixture-of-LoRAs) from the paper's description (no official code to compare).

Feng et al. 2024, "Mixture-of-LoRAs: An Efficient Multitask Tuning for Large Language
Models", arXiv 2403.03432 (COLING 2024). No code was found (survey lists of MoE-LoRA
code give an empty link for it; see docs/fidelity.md). Stage two as the paper describes
it and our module docstring restates it: the task LoRAs are frozen, a router chooses
among them per sequence, and a domain-label (task) cross-entropy trains the router.

Evaluated sequence by sequence and expert by expert (nothing stacked or vectorised).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {"repository": "none published", "paper": "arXiv 2403.03432"}


def moa_sequence_delta(
    x: torch.Tensor,
    expert_As: list[torch.Tensor],
    expert_Bs: list[torch.Tensor],
    router_weight: torch.Tensor,
    *,
    alpha: float,
    r: int,
    top_k: int,
    prompt_mask: torch.Tensor,
) -> torch.Tensor:
    """MoA with one routing decision per sequence: the router reads the mean of the
    module input over the sequence's prompt tokens, the top ``k`` task LoRAs are used for
    every token of the sequence with a softmax over their logits (``k = 1``: weight 1,
    the chosen task's LoRA alone). ``x``: ``(B, L, d_in)``; ``prompt_mask``: ``(B, L)``."""
    out = torch.zeros(*x.shape[:2], expert_Bs[0].shape[0], dtype=x.dtype)
    for b in range(x.shape[0]):
        m = prompt_mask[b].to(x.dtype)
        pooled = (x[b] * m[:, None]).sum(0) / m.sum()
        logits = F.linear(pooled, router_weight)
        values, index = logits.topk(top_k)
        gates = torch.softmax(values, dim=0)
        for j in range(top_k):
            e = int(index[j])
            out[b] = out[b] + gates[j] * (alpha / r) * F.linear(
                F.linear(x[b], expert_As[e]), expert_Bs[e]
            )
    return out


def moa_router_logits(
    x: torch.Tensor, router_weight: torch.Tensor, prompt_mask: torch.Tensor
) -> torch.Tensor:
    """The per-sequence router logits (``(B, T)``) the domain-label loss is taken on."""
    m = prompt_mask.to(x.dtype)
    pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    return F.linear(pooled, router_weight)
