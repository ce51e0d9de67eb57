"""MixLoRA's routed layer and auxiliary loss as the authors' code computes them.

Sources read (Li et al. 2024, arXiv 2404.15159):

* https://github.com/TUDB-Labs/MixLoRA, commit d59d09b647a9b07b0808cb0b669306c9c9215b29,
  ``mixlora/model.py`` (``MixLoraSparseMoe.forward``), ``mixlora/lora_linear.py``
  (``LoraLinear.lora_forward``: ``residual + B(A(dropout(x))) · alpha / r``),
  ``mixlora/config.py`` (top-k 2, router init range 0.02, aux-loss coefficient 0.001,
  jitter 0);
* the training-side loss in the same repository's history, commit
  76b3e1c0fb236c1b86e2b73b7e4382627d82622f, ``mlora/mix_lora.py``
  (``_mixtral_load_balancing_loss_func``, ``MixtralRouterLoss``; a copy of m-LoRA's).

Routing (per token): ``w = softmax(W_g x)`` over all experts, the top ``k`` kept and
**renormalised** to sum to one, each selected expert's output (frozen base plus its
LoRA) weighted by ``w`` and summed with ``index_add_``. MixLoRA routes whole FFN
blocks; ``mixlora_linear_forward`` is that routing applied to one linear layer (the
"FFN" is the linear itself), which is where our per-module layers can be compared.
Because the renormalised weights sum to one, ``sum_e w_e (W0 x + delta_e)`` is
``W0 x + sum_e w_e delta_e``; with ``k = 1`` the weight is the constant 1.

Auxiliary loss (Switch Transformer eqs. 4-6 as Mixtral implements them):
``E · sum_{j,e} f_{j,e} · P_e`` with ``f_{j,e}`` the share of (real) tokens whose
``j``-th choice is ``e`` (so ``sum_{j,e} f = k``) and ``P_e`` the mean router
probability over real tokens; the coefficient multiplies it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {
    "repository": "https://github.com/TUDB-Labs/MixLoRA",
    "commit": "d59d09b647a9b07b0808cb0b669306c9c9215b29 (forward); "
    "76b3e1c0fb236c1b86e2b73b7e4382627d82622f (aux loss)",
    "file": "mixlora/model.py, mixlora/lora_linear.py; mlora/mix_lora.py",
    "function": "MixLoraSparseMoe.forward; _mixtral_load_balancing_loss_func",
}


def mixlora_linear_forward(
    x: torch.Tensor,
    base_weight: torch.Tensor,
    base_bias: torch.Tensor | None,
    gate: torch.Tensor,
    expert_As: list[torch.Tensor],
    expert_Bs: list[torch.Tensor],
    *,
    top_k: int,
    lora_alpha: float,
    r: int,
) -> torch.Tensor:
    """``x``: ``(batch, seq, d_in)``; ``gate``: ``(E, d_in)``; ``A_e``: ``(r, d_in)``;
    ``B_e``: ``(d_out, r)``. Dropout and jitter are off (eval, or rate 0)."""
    batch, seq, d_in = x.shape
    hidden = x.reshape(-1, d_in)
    logits = F.linear(hidden, gate)
    weights = torch.softmax(logits, dim=1)
    weights, selected = torch.topk(weights, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    n_experts = gate.shape[0]
    expert_mask = F.one_hot(selected, num_classes=n_experts).permute(2, 1, 0)  # (E, k, N)
    final = torch.zeros(hidden.shape[0], base_weight.shape[0], dtype=x.dtype)
    scaling = lora_alpha / r
    for e in range(n_experts):
        choice, tokens = torch.where(expert_mask[e])
        h = hidden[tokens]
        expert_out = (
            F.linear(h, base_weight, base_bias)
            + F.linear(F.linear(h, expert_As[e]), expert_Bs[e]) * scaling
        )
        final = final.index_add(0, tokens, expert_out * weights[tokens, choice, None])
    return final.reshape(batch, seq, -1)


def mixtral_load_balancing_loss(
    gate_logits: list[torch.Tensor],
    num_experts: int,
    top_k: int,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The loss before the coefficient. ``gate_logits``: one ``(batch·seq, E)`` tensor per
    layer; ``attention_mask``: ``(batch, seq)`` with 1 for real tokens."""
    logits = torch.cat(gate_logits, dim=0)
    probs = torch.softmax(logits, dim=-1)
    _, selected = torch.topk(probs, top_k, dim=-1)
    expert_mask = F.one_hot(selected, num_experts).to(probs.dtype)  # (N, k, E)
    if attention_mask is None:
        tokens_per_expert = expert_mask.mean(dim=0)  # (k, E)
        prob_per_expert = probs.mean(dim=0)
    else:
        layers = logits.shape[0] // attention_mask.numel()
        m = attention_mask.reshape(-1).to(probs.dtype).repeat(layers)  # (N,)
        tokens_per_expert = (expert_mask * m[:, None, None]).sum(0) / m.sum()
        prob_per_expert = (probs * m[:, None]).sum(0) / m.sum()
    return torch.sum(tokens_per_expert * prob_per_expert.unsqueeze(0)) * num_experts
