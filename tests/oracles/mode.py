"""MoDE's layer from the paper's equations, dyad by dyad (no public code).

Source read: Ning et al. 2024, "MoDE: Effective Multi-task Parameter Efficient Fine-Tuning
with a Mixture of Dyadic Experts", arXiv 2408.01505 (Findings of NAACL 2025), the method
section and Figure 1 ("3 experts and a rank of 4, each slice a rank dimension, routed
independently"). A shared down-projection ``A`` (rows ``a_j``), per-expert up-projections
``B_i`` (columns ``b_{i,j}``), one router per rank dimension ``j``:

    delta(x) = (alpha / r) · sum_j sum_i G_j(x)_i · b_{i,j} (a_jᵀ x),   G_j = softmax(W_{g,j} x)

``top_k`` (the harness's budget-matching form) keeps the ``k`` largest logits of each rank
dimension with the softmax over them (top-1: the full-softmax probability of the chosen
expert). Every rank dimension and expert is a separate term here: no stacking, no einsum.
"""

from __future__ import annotations

import torch

SOURCE = {
    "paper": "arXiv 2408.01505",
    "section": "Method (Mixture of Dyadic Experts), Figure 1",
    "code": None,
}


def mode_delta(
    x: torch.Tensor,
    a_rows: list[torch.Tensor],
    b_cols: list[list[torch.Tensor]],
    routers: list[torch.Tensor],
    *,
    alpha: float,
    top_k: int | None = None,
) -> torch.Tensor:
    """``x``: ``(N, d_in)``; ``a_rows[j]``: ``(d_in,)``; ``b_cols[i][j]``: ``(d_out,)``;
    ``routers[j]``: ``(n, d_in)``. Returns ``(N, d_out)``."""
    r, n = len(a_rows), len(b_cols)
    out = torch.zeros(x.shape[0], b_cols[0][0].shape[0], dtype=x.dtype)
    for j in range(r):
        logits = x @ routers[j].T  # (N, n)
        probs = torch.softmax(logits, dim=-1)
        if top_k is not None and top_k < n:
            top = logits.topk(top_k, dim=-1).indices
            keep = torch.zeros_like(probs).scatter(1, top, 1.0)
            if top_k == 1:
                gates = probs * keep
            else:
                masked = probs * keep
                gates = masked / masked.sum(-1, keepdim=True)
        else:
            gates = probs
        h = x @ a_rows[j]  # (N,)
        for i in range(n):
            out = out + (gates[:, i] * h).unsqueeze(-1) * b_cols[i][j] * (alpha / r)
    return out
