"""HydraLoRA's layer as the authors' code computes it (independent re-implementation).

Source read: https://github.com/Clin0212/HydraLoRA (Tian et al. 2024, arXiv 2404.19245),
commit afb693bc12386b96431636a27168c9f656437638, ``HydraLoRA/peft/tuners/lora.py``:
``Linear.__init__``, ``Linear.reset_parameters`` and ``Linear.forward``; the training
script ``HydraLoRA/fine-tuning.sh`` (rank 4, alpha 32, dropout 0.05, 4 B heads).

One shared down-projection ``A`` (``nn.Linear(d_in, r)``), ``N`` up-projections ``B_i``
(``nn.Linear(r, d_out)``, zero init), a router ``nn.Linear(d_in, N, bias=False)``
(Kaiming-uniform init) reading the *undropped* input, and a dense softmax over all heads:

    y = W0 x + sum_i softmax(W_g x)_i · B_i A dropout(x) · alpha / r

The softmax is taken in float32 and cast to the output dtype (``softmax_dtype``); the
layer also returns a constant zero "balance loss" (no auxiliary loss is used).

Our built-in ``hydralora`` (methods/hydralora.py) is held against it directly; it is also
the common reference for a routed LoRA with an asymmetric (shared-A) structure, and two
other layers contain it exactly: MoLoRA (dense) with every expert's A tied, and MALoRA
with ``P_e = I`` and ``k = E``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {
    "repository": "https://github.com/Clin0212/HydraLoRA",
    "commit": "afb693bc12386b96431636a27168c9f656437638",
    "file": "HydraLoRA/peft/tuners/lora.py",
    "function": "Linear.forward",
}


def hydralora_forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_Bs: list[torch.Tensor],
    route_weight: torch.Tensor,
    *,
    lora_alpha: float,
    r: int,
    softmax_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``x``: ``(batch, seq, d_in)``; ``lora_A``: ``(r, d_in)``; each ``B_i``: ``(d_out, r)``;
    ``route_weight``: ``(N, d_in)``. Dropout is the identity (eval, or rate 0)."""
    result = F.linear(x, base_weight, base_bias)
    scaling = lora_alpha / r
    route = torch.softmax(F.linear(x, route_weight), dim=-1, dtype=softmax_dtype).to(result.dtype)
    for i, lora_B in enumerate(lora_Bs):
        head = F.linear(F.linear(x, lora_A), lora_B)
        result = result + route[:, :, i].unsqueeze(-1) * head * scaling
    return result
