"""FlyLoRA as the authors' code computes it (independent re-implementation, plain torch).

Source read: https://github.com/gfyddha/FlyLoRA (Zou et al., NeurIPS 2025), commit
91d9e3672d3d2b799aea05a3046f7714e8ffb85e:

* ``peft/src/peft/tuners/lora/layer.py`` (their modified peft, the training code; lines
  marked ``# modified``): ``LoraLayer.reset_lora_parameters`` with
  ``init_lora_weights="sparse"`` and ``Linear.forward``;
* ``finetune.py`` (``lora_A`` and ``lora_topk_bias`` frozen; ``A_type``, ``top_k``,
  ``bias_u``) and ``scripts/run_mmlu.sh`` (r 32, alpha 64, top_k 8, bias_u 0.001, sparse A);
* ``flylora.py`` (their "minimal implementation": selection by ``|y + d|``).

The training forward, step by step (``r`` ranks, ``k = top_k``):

1. ``activations = lora_A(dropout(x))`` **under ``torch.no_grad()``** (``A`` is frozen; no
   gradient reaches ``x`` through the adapter);
2. ``selected = topk(activations + lora_topk_bias, k)`` (signed, no absolute value);
3. ``mask`` = 1 on the selected ranks; ``result += lora_B(activations * mask) · alpha / r``;
4. at every forward (training or not): ``c = bincount(selected, minlength=r)`` over all
   tokens, ``lora_topk_bias += bias_u · sign(mean(c) - c)``.

Init (``"sparse"``): ``p = in_features // (r // top_k)``; per row ``i`` a mask of
``randperm(in_features)[:p]``; then ``normal_(weight, 0, 1/r)`` on the whole matrix, times
the mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {
    "repository": "https://github.com/gfyddha/FlyLoRA",
    "commit": "91d9e3672d3d2b799aea05a3046f7714e8ffb85e",
    "file": "peft/src/peft/tuners/lora/layer.py (+ flylora.py)",
    "function": "Linear.forward, LoraLayer.reset_lora_parameters",
}


def sparse_init(weight: torch.Tensor, r: int, top_k: int) -> torch.Tensor:
    """Their ``init_lora_weights == "sparse"`` branch, in place on ``weight`` (``r x n``)."""
    p = weight.size(1) // (r // top_k)
    mask = torch.zeros_like(weight, dtype=torch.bool)
    for i in range(r):
        indices = torch.randperm(weight.size(1))[:p]
        mask[i, indices] = True
    torch.nn.init.normal_(weight, mean=0, std=1 / r)
    weight.data *= mask.float()
    return weight


def flylora_forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    topk_bias: torch.Tensor,
    *,
    top_k: int,
    lora_alpha: float,
    bias_u: float,
    magnitude: bool = False,
    input_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of their layer: ``(output, bias after this forward)``.

    ``x``: ``(batch, seq, d_in)``; ``lora_A``: ``(r, d_in)``; ``lora_B``: ``(d_out, r)``;
    ``topk_bias``: ``(r,)`` (left untouched; the updated copy is returned).
    ``magnitude``: select by ``|y + d|`` (their ``flylora.py``); ``input_grad``: compute
    ``A x`` with its gradient (their ``flylora.py``; the training code uses ``no_grad``).
    """
    r = lora_A.shape[0]
    result = F.linear(x, base_weight, base_bias)
    if input_grad:
        activations = F.linear(x, lora_A)
    else:
        with torch.no_grad():
            activations = F.linear(x, lora_A)
    score = activations + topk_bias.unsqueeze(0)
    _, selected = torch.topk(score.abs() if magnitude else score, top_k, dim=-1)
    mask = torch.zeros_like(activations)
    mask.scatter_(-1, selected, 1.0)
    result = result + F.linear(activations * mask, lora_B) * (lora_alpha / r)
    ci = torch.bincount(selected.flatten(), minlength=r).to(topk_bias.dtype)
    new_bias = topk_bias.detach().clone() + bias_u * (ci.mean() - ci).sign()
    return result, new_bias
