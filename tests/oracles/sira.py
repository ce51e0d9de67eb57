"""SiRA from the paper's equations (no official code exists to compare against).

Zhu et al. 2023, "SiRA: Sparse Mixture of Low Rank Adaptation", arXiv 2311.09179 (Google).
No code was released: the arXiv abstract, Papers-with-Code and Hugging Face paper pages
list none, and surveys that collect MoE-LoRA code links give none for SiRA (see
docs/fidelity.md). This oracle is written from the method as the paper states it
(top-``k`` experts, a per-expert capacity, expert dropout on the gate) and from the
standard references it builds on (GShard's capacity and dispatch order, Switch
Transformer's load-balancing loss), deliberately as explicit loops, nothing vectorised:

* logits ``W_g x``; each token's ``k`` largest logits, in descending order;
* gates: softmax over the ``k`` selected logits (``switch_top1=True`` replaces the
  ``k = 1`` case, whose gate would be the constant 1, by the selected expert's
  probability under the softmax over all experts, as Switch Transformer does);
* capacity ``C = ceil(cf · k · T / E)`` tokens per expert, ``T`` the number of real
  tokens; assignments are admitted in GShard's priority order (every token's first
  choice, in token order, before any token's second choice, ...); an assignment past
  ``C`` is dropped (its gate is zero, the others are not renormalised); padding
  neither consumes capacity nor is routed;
* expert dropout: the gate matrix times a given keep mask / (1 - p) (training only);
* ``delta = sum_{kept (token, e)} g · (alpha / r) B_e A_e x``;
* auxiliary loss ``E · sum_e f_e P_e``: ``f_e`` the share of the ``T·k`` (pre-capacity)
  assignments that chose ``e``, ``P_e`` the mean over real tokens of the full softmax.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SOURCE = {
    "repository": "none published",
    "paper": "arXiv 2311.09179 (SiRA); GShard arXiv 2006.16668 (capacity, dispatch order); "
    "Switch Transformer arXiv 2101.03961 eq. 4 (load-balancing loss)",
}


def sira_routing(
    logits: torch.Tensor,
    *,
    top_k: int,
    capacity_factor: float | None,
    token_mask: torch.Tensor | None = None,
    switch_top1: bool = False,
) -> tuple[list[list[int]], list[list[torch.Tensor]], list[list[bool]]]:
    """Per token: selected experts, their gates and whether each assignment is kept."""
    n_tokens, n_experts = logits.shape
    real = [True] * n_tokens if token_mask is None else [bool(v) for v in token_mask]
    plain = logits.detach()
    chosen, gates = [], []
    for n in range(n_tokens):
        order = sorted(range(n_experts), key=lambda e: float(plain[n, e]), reverse=True)[:top_k]
        chosen.append(order)
        sel = torch.stack([logits[n, e] for e in order])
        if top_k == 1 and switch_top1:
            gates.append([torch.softmax(logits[n], dim=0)[order[0]]])
        else:
            soft = torch.softmax(sel, dim=0)
            gates.append([soft[j] for j in range(top_k)])
    kept = [[real[n]] * top_k for n in range(n_tokens)]
    if capacity_factor is not None:
        n_real = sum(real)
        capacity = math.ceil(capacity_factor * top_k * n_real / n_experts)
        used = [0] * n_experts
        for j in range(top_k):  # every token's j-th choice before any (j+1)-th choice
            for n in range(n_tokens):
                if not real[n]:
                    continue
                e = chosen[n][j]
                if used[e] < capacity:
                    used[e] += 1
                else:
                    kept[n][j] = False
    return chosen, gates, kept


def sira_delta(
    x: torch.Tensor,
    expert_As: list[torch.Tensor],
    expert_Bs: list[torch.Tensor],
    router_weight: torch.Tensor,
    *,
    top_k: int,
    alpha: float,
    r: int,
    capacity_factor: float | None = None,
    token_mask: torch.Tensor | None = None,
    dropout_keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    switch_top1: bool = False,
) -> torch.Tensor:
    """``x``: ``(N, d_in)`` flat tokens; ``dropout_keep``: ``(N, k)`` 0/1 (training only)."""
    logits = F.linear(x, router_weight)
    chosen, gates, kept = sira_routing(
        logits,
        top_k=top_k,
        capacity_factor=capacity_factor,
        token_mask=token_mask,
        switch_top1=switch_top1,
    )
    rows = []
    for n in range(x.shape[0]):
        out = torch.zeros(expert_Bs[0].shape[0], dtype=x.dtype)
        for j, e in enumerate(chosen[n]):
            if not kept[n][j]:
                continue
            g = gates[n][j]
            if dropout_keep is not None:
                g = g * dropout_keep[n, j] / (1.0 - dropout_p)
            out = out + g * (alpha / r) * (expert_Bs[e] @ (expert_As[e] @ x[n]))
        rows.append(out)
    return torch.stack(rows)


def switch_aux_loss(
    logits: torch.Tensor, *, top_k: int, token_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``E · sum_e f_e · P_e`` over real tokens (``f`` from the pre-capacity top-k choice)."""
    n_tokens, n_experts = logits.shape
    real = [True] * n_tokens if token_mask is None else [bool(v) for v in token_mask]
    probs = torch.softmax(logits, dim=-1)
    counts = [0] * n_experts
    p_sum = torch.zeros(n_experts, dtype=logits.dtype)
    n_real = 0
    for n in range(n_tokens):
        if not real[n]:
            continue
        n_real += 1
        p_sum = p_sum + probs[n]
        ranked = sorted(range(n_experts), key=lambda e: float(logits[n, e].detach()), reverse=True)
        for e in ranked[:top_k]:
            counts[e] += 1
    f = torch.tensor(counts, dtype=logits.dtype) / (n_real * top_k)
    return n_experts * torch.sum(f * p_sum / n_real)
