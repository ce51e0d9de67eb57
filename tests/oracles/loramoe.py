"""LoRAMoE's layer and localized balancing constraint as the authors' code computes them
(independent re-implementation, plain torch).

Source read: https://github.com/Ablustrund/LoRAMoE (Dou et al. 2023, arXiv 2312.09979),
commit 117728885a4069b74d3fe0f2d71ca84fa5918df4, ``peft/tuners/lora.py``: ``Linear.__init__``
(``lora_route = nn.Linear(d_in, lora_num, bias=False)``, one ``lora_A{i}`` / ``lora_B{i}``
pair per expert, ``scaling = lora_alpha / r``), ``Linear.cv_squared`` and ``Linear.forward``;
``transformers/models/llama/modeling_llama.py`` (each layer's ``blcls`` summed into the
loss); ``run_loramoe.sh`` (rank 4, alpha 32, 8 experts, ``blc_alpha = blc_weight = 0``).

    route = softmax(W_g x) in float32, cast to the output dtype          (B, T, E)
    y = W0 x + sum_i route[..., i] · B_i A_i dropout(x) · alpha / r
    blcls = cv²( (route.sum(T) ⊙ where(cat(types==1 x E/2, types==0 x E/2), 1+a, 1-a)).flatten() ) · w
    cv²(z) = z.float().var() / (z.float().mean()² + 1e-10)   (0 for a single entry)

The sum over ``T`` runs over every position of the batch, padding included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {
    "repository": "https://github.com/Ablustrund/LoRAMoE",
    "commit": "117728885a4069b74d3fe0f2d71ca84fa5918df4",
    "file": "peft/tuners/lora.py",
    "function": "Linear.forward, Linear.cv_squared",
}


def cv_squared(x: torch.Tensor) -> torch.Tensor:
    eps = 1e-10
    if x.shape[0] == 1:
        return torch.tensor([0], device=x.device, dtype=x.dtype)[0]
    return x.float().var() / (x.float().mean() ** 2 + eps)


def loramoe_forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    route_weight: torch.Tensor,
    lora_As: list[torch.Tensor],
    lora_Bs: list[torch.Tensor],
    *,
    lora_alpha: float,
    r: int,
    task_types: torch.Tensor | None = None,
    blc_alpha: float = 0.0,
    blc_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x``: ``(batch, seq, d_in)``; each ``A_i``: ``(r, d_in)``, ``B_i``: ``(d_out, r)``;
    ``route_weight``: ``(E, d_in)``; ``task_types``: ``(batch,)`` of 0/1. Returns
    ``(result, blcls)``. Dropout is the identity."""
    lora_num = len(lora_As)
    result = F.linear(x, base_weight, base_bias)
    scaling = lora_alpha / r
    route = torch.softmax(F.linear(x, route_weight), dim=-1, dtype=torch.float32).to(result.dtype)
    for i in range(lora_num):
        result = result + torch.unsqueeze(route[:, :, i], -1) * F.linear(F.linear(x, lora_As[i]), lora_Bs[i]) * scaling
    blcls = torch.zeros(1)[0].to(result)
    if task_types is not None and blc_weight != 0:
        task_types = task_types.view(-1, 1)
        blcls = cv_squared((
            route.sum(dim=1) * torch.where(
                torch.concat(
                    ((task_types == 1).repeat(1, lora_num // 2), (task_types == 0).repeat(1, lora_num // 2)), dim=-1
                ),
                1.0 + blc_alpha, 1.0 - blc_alpha,
            )
        ).flatten()) * blc_weight  # fmt: skip
    return result, blcls
