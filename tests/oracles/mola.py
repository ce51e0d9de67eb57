"""MoLA's layer as the authors' code computes it (independent re-implementation, plain torch).

Source read: https://github.com/GCYZSL/MoLA (Gao et al. 2024, arXiv 2402.08562), commit
01785c84c70846999638b11b88409fdf86361d9a, ``src/mola_lora_hacked.py``: ``Linear_MoE``
(``number_experts[layer_index]`` and ``top_k[layer_index]`` per decoder layer, a router
``nn.Linear(d_in, E, bias=False)``, one ``lora_A`` / ``lora_B`` per expert, ``scaling =
lora_alpha / r``) and ``Linear_MoE.forward``; ``mola_training.py`` and the README (the
"2-4-6-8" allocation: ``number_experts = 2 x 8, 4 x 8, 6 x 8, 8 x 8`` over the 32 layers,
``top_k = 2``, rank 8, alpha 16; the Switch auxiliary loss ``obalance`` off by default).

    p = softmax(W_g x) in float32 over the layer's E experts
    w, S = topk(p, k);  w = w / sum(w), cast to x's dtype
    y = W0 x + sum_{e in S} w_e · B_e A_e dropout(x) · alpha / r

``softmax_dtype`` exists to compare in float64 (the authors take it in float32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {
    "repository": "https://github.com/GCYZSL/MoLA",
    "commit": "01785c84c70846999638b11b88409fdf86361d9a",
    "file": "src/mola_lora_hacked.py, mola_training.py",
    "function": "Linear_MoE.forward",
}

#: the README's per-layer allocation for 32 decoder layers ("2-4-6-8")
PAPER_NUMBER_EXPERTS = [2] * 8 + [4] * 8 + [6] * 8 + [8] * 8
PAPER_TOP_K = [2] * 32


def linear_moe_forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    router_weight: torch.Tensor,
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    *,
    top_k: int,
    lora_alpha: float,
    r: int,
    softmax_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    result = F.linear(x, base_weight, base_bias)
    batch_size, sequence_length, hidden_dim = x.shape
    flat = x.view(-1, hidden_dim)
    router_logits = F.linear(flat, router_weight)
    routing_weights = F.softmax(router_logits, dim=1, dtype=softmax_dtype)
    routing_weights, selected = torch.topk(routing_weights, top_k, dim=-1)
    routing_weights = routing_weights / routing_weights.sum(dim=-1, keepdim=True)
    routing_weights = routing_weights.to(x.dtype)
    expert_mask = F.one_hot(selected, num_classes=len(lora_As)).permute(2, 1, 0)
    final = torch.zeros((batch_size * sequence_length, base_weight.shape[0]), dtype=x.dtype)
    for e in range(len(lora_As)):
        idx, top_x = torch.where(expert_mask[e])
        if top_x.shape[0] == 0:
            continue
        state = flat[top_x]
        out = F.linear(F.linear(state, lora_As[e]), lora_Bs[e]) * (lora_alpha / r)
        final = final.index_add(0, top_x, out * routing_weights[top_x, idx, None])
    return result + final.view(batch_size, sequence_length, -1)
