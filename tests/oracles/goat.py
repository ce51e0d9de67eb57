"""GOAT's layer as the authors' code computes it (independent re-implementation, plain torch).

Source read: https://github.com/Facico/GOAT-PEFT (Fan et al., ICML 2025, arXiv 2502.16894),
commit ef4d21a41682bcf3b808f9273ace16cccfc7c648:

* ``goat/peta/src/goat/layer.py``: ``GOATLayer.update_layer`` (``init_type="goat"``: the SVD
  segments, ``rho = 10``, ``scaling = lora_alpha / rank_list[i]`` with ``rank_list[i] =
  r // E``, and ``base_layer.weight -= init_cof · scaling · lora_B @ lora_A``),
  ``TopKGOATLayer.forward`` (softmax router, top-k, renormalised) and ``get_layer_loss``;
* ``goat/train_nlg.py`` (``lora=src.goat`` -> ``init_type="goat"``, ``init_cof = 1/E``) and
  the scripts ``math.sh`` / ``code.sh`` / ``chat.sh`` / ``glue.sh`` (``lora=src.goat``,
  ``aux=1e-3``, no ``SCALING`` override).

Note their naming: ``V, S, Uh = torch.linalg.svd(W)``, i.e. ``V`` holds the *left* singular
vectors (``d_out x m``) and ``Uh`` the right ones (``m x d_in``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {
    "repository": "https://github.com/Facico/GOAT-PEFT",
    "commit": "ef4d21a41682bcf3b808f9273ace16cccfc7c648",
    "file": "goat/peta/src/goat/layer.py",
    "function": "GOATLayer.update_layer (init_type='goat'), TopKGOATLayer.forward, get_layer_loss",
}

RHO = 10


def goat_init(weight: torch.Tensor, lora_rank: int, num_experts: int, lora_alpha: float, init_cof: float):
    """Their ``svd_init`` for ``init_type == "goat"``: per-expert ``(A_e, B_e)`` lists, the
    scaling, and the *modified* base weight ``W0 - init_cof · scaling · B A``."""
    rank_list = [lora_rank // num_experts for _ in range(num_experts)]
    scaling = lora_alpha / rank_list[0]
    V, S, Uh = torch.linalg.svd(weight.data, full_matrices=False)
    Vlen = V.shape[-1] // num_experts
    Mlen = lora_rank // num_experts
    V_piece = [V[:, i * Vlen:i * Vlen + Mlen] for i in range(num_experts)]
    S_piece = [S[i * Vlen:i * Vlen + Mlen] for i in range(num_experts)]
    U_piece = [Uh[i * Vlen:i * Vlen + Mlen] for i in range(num_experts)]
    Vr = torch.cat(V_piece, dim=1)
    Sr = torch.cat(S_piece)
    Uhr = torch.cat(U_piece, dim=0)
    Sr = Sr / (scaling * RHO)
    lora_A = torch.diag(torch.sqrt(Sr)) @ Uhr
    lora_B = Vr @ torch.diag(torch.sqrt(Sr))
    As, Bs, total = [], [], 0
    for i in range(num_experts):
        As.append(lora_A[total:total + rank_list[i], :].contiguous())
        Bs.append(lora_B[:, total:total + rank_list[i]].contiguous())
        total += rank_list[i]
    new_weight = weight - init_cof * scaling * lora_B @ lora_A
    return As, Bs, scaling, new_weight


def goat_forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    As: list[torch.Tensor],
    Bs: list[torch.Tensor],
    *,
    top_k: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``LinearGOATLayer.forward`` (no dropout): ``(output, layer_loss)``."""
    result = F.linear(x, base_weight, base_bias)
    flat = x.reshape(-1, x.shape[-1])
    gate_logits = F.softmax(F.linear(flat, gate_weight), dim=-1)
    weights, selected = torch.topk(gate_logits, k=top_k, dim=-1)
    weights = weights / torch.sum(weights, dim=-1, keepdim=True, dtype=x.dtype)
    out = torch.zeros(flat.shape[0], Bs[0].shape[0], dtype=x.dtype)
    for i in range(len(As)):
        batch_idx, nth = torch.where(selected == i)
        out = out.index_add(0, batch_idx, weights[batch_idx, nth, None] * (F.linear(F.linear(flat[batch_idx], As[i]), Bs[i]) * scaling))
    # get_layer_loss
    num_inputs, E = gate_logits.shape[0], len(As)
    counts = torch.bincount(selected.reshape(-1), minlength=E)
    loss = E * torch.sum((counts / num_inputs) * (gate_logits.sum(0) / num_inputs))
    return result + out.view(*x.shape[:-1], -1), loss
