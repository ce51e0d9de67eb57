"""SMoRA as the authors' code computes it (independent re-implementation, plain torch).

Source read: https://github.com/StyxXuan/smora (the official implementation named by
the KDD 2026 paper, arXiv 2501.15103), commit 7e7ada17fda3bc1a82b80536617074a62d41f715,
``packages/peft/src/peft/tuners/srmole/layer.py``: ``SRMoLELayer.update_layer`` and
``SRMoLELinear.forward`` (method name there: "SRMoLE"). Training configs read:
``scripts/traing_configs/config_flan/llama2_7b/llama2_7b_lora_srmole.yaml`` (rank 64,
``activate_r`` 8, alpha 16, micro-batch 8, gradient accumulation 16, lr 1e-4, 3 epochs).

What that forward does, step by step (``R`` = LoRA rank, ``K`` = ``activate_r`` active
ranks, ``p`` = ``rank_partition`` ranks per expert, ``E = R / p`` experts):

1. ``x`` goes through the LoRA dropout (``lora_dropout``, 0.0 by default in the
   repository's LLaMA-Factory); the *dropped* ``x`` feeds both the router and ``A``.
2. scores ``s = sigmoid(W_g x)`` with ``W_g``: ``nn.Linear(d_in, E, bias=False)``
   (left at nn.Linear's default init), repeated ``p`` times to one score per rank.
3. ``b`` (``lora_biases``, one per *rank*, ``nn.Parameter(zeros(R), requires_grad=False)``)
   is added and the top ``K`` *ranks* of ``s + b`` are selected.
4. bias update, **inside the forward, whenever the module is in training mode**:
   ``counts = bincount(selected rank indices of every token in the micro-batch)`` (integer
   counts; padding tokens included, no mask), ``b += u * sign(mean(counts) - counts)``,
   ``u = bias_update_rate = 1e-5`` (the constructor default; no config passes another).
   The selection of this forward used the bias from before the update.
5. gate: the selected values of ``s + b`` (the *biased* scores) scattered into a zero
   vector, divided by their sum, times ``K``.
6. ``delta = (B (gate ⊙ A x)) · alpha / K`` (``scaling = lora_alpha / activate_r``); the
   repository computes it with two TVM gather kernels (``IndexedMatMul_A/B``) or, with
   ``dense_compute``, with einsums; both are the function written here.

``gate_includes_bias`` exists only to show the one difference in the gate (step 5) in
``tests/test_oracles.py``; the authors' code corresponds to ``True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {
    "repository": "https://github.com/StyxXuan/smora",
    "commit": "7e7ada17fda3bc1a82b80536617074a62d41f715",
    "file": "packages/peft/src/peft/tuners/srmole/layer.py",
    "function": "SRMoLELinear.forward",
}

#: the constructor default of ``SRMoLELinear`` (``bias_update_rate``); never overridden there
AUTHORS_BIAS_UPDATE_RATE = 1e-5


def srmole_forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router_weight: torch.Tensor,
    lora_biases: torch.Tensor,
    *,
    activate_r: int,
    rank_partition: int,
    lora_alpha: float,
    training: bool,
    bias_update_rate: float = AUTHORS_BIAS_UPDATE_RATE,
    gate_includes_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward of the authors' layer: ``(output, biases after this forward)``.

    ``x``: ``(batch, seq, d_in)``; ``lora_A``: ``(R, d_in)``; ``lora_B``: ``(d_out, R)``;
    ``router_weight``: ``(R // rank_partition, d_in)``; ``lora_biases``: ``(R,)``.
    The returned bias is a new tensor (the input is left untouched); in eval mode it is
    an unchanged copy, as the authors' code updates only when ``self.training``.
    """
    rank = lora_A.shape[0]
    if router_weight.shape[0] * rank_partition != rank:
        raise ValueError("router rows x rank_partition must equal the LoRA rank")
    result = F.linear(x, base_weight, base_bias)

    scores = torch.sigmoid(F.linear(x, router_weight))  # (batch, seq, E)
    scores = scores.repeat_interleave(rank_partition, dim=-1)  # one score per rank
    biased = scores + lora_biases.view(1, 1, -1)
    top_values, indices = biased.topk(activate_r, dim=-1)

    new_biases = lora_biases.detach().clone()
    if training:
        with torch.no_grad():
            counts = torch.bincount(indices.reshape(-1), minlength=rank).to(lora_biases.dtype)
            new_biases += bias_update_rate * torch.sign(counts.mean() - counts)

    gate_values = top_values if gate_includes_bias else scores.gather(-1, indices)
    sparse = torch.zeros_like(scores).scatter(-1, indices, gate_values)
    gating = sparse / sparse.sum(dim=-1, keepdim=True) * activate_r

    mid = F.linear(x, lora_A)  # (batch, seq, R)
    delta = F.linear(mid * gating, lora_B) * (lora_alpha / activate_r)
    return result + delta, new_biases
