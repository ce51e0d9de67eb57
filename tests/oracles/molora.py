"""MoLoRA as the authors' code computes it (independent re-implementation, plain torch).

Source read: https://github.com/for-ai/parameter-efficient-moe (Cohere For AI, the code
of Zadouri et al. 2023, arXiv 2309.05444; JAX/Flax on T5X), commit
e2683fead45eb480bcbf9c2e646fbbc2f7fc6efb: ``src/molora.py`` (``MoLoRa.__call__``),
``src/routing.py`` (``Router._compute_router_probabilities``, ``_top_k_mask``),
``configs/molora.gin`` (rank 4, 10 experts, router without bias, router init
normal(0.02), no jitter, ``ignore_padding_tokens = False``).

The forward, in the repository's own tensor layouts:

* ``lora_A``: ``(E, d_in, r)``, ``lora_B``: ``(E, r, d_out)``, router kernel
  ``(d_in, E)`` (``DenseGeneral``, ``use_bias = False`` in the gin config);
* every expert runs on every token: ``bax[e] = (x A_e) B_e``;
* ``p = softmax(x W_g)`` over **all** experts (float32 in the repository);
* optional ``top_k``: ``p`` multiplied by the 0/1 mask of the ``k`` largest
  probabilities, **not renormalised** (``_top_k_mask``; no top-k in the released gin);
* ``delta = (sum_e p_e bax[e]) · alpha / r`` with ``alpha = 16`` a class constant (not
  configurable from gin) and ``r`` the expert rank.

The router's load-balancing loss in ``routing.py`` is defined but never called, and the
padding mask only rescales logits after the probabilities were taken, so neither
changes the output. ``renormalize`` is not in the authors' code; it exists to show the
mapping to the renormalised top-k form in ``tests/test_oracles.py``.
"""

from __future__ import annotations

import torch

SOURCE = {
    "repository": "https://github.com/for-ai/parameter-efficient-moe",
    "commit": "e2683fead45eb480bcbf9c2e646fbbc2f7fc6efb",
    "file": "src/molora.py, src/routing.py, configs/molora.gin",
    "function": "MoLoRa.__call__, Router._compute_router_probabilities",
}


def molora_delta(
    x: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    router_kernel: torch.Tensor,
    *,
    rank: int,
    alpha: float = 16.0,
    top_k: int | None = None,
    renormalize: bool = False,
) -> torch.Tensor:
    """The MoLoRa module's output (the adapter's additive term), ``x``: ``(batch, seq, d_in)``."""
    ax = torch.einsum("bsd,edr->bser", x, lora_A)
    bax = torch.einsum("bser,erd->bsed", ax, lora_B)
    probs = torch.softmax(torch.einsum("bsd,de->bse", x, router_kernel), dim=-1)
    if top_k is not None:
        top = probs.topk(top_k, dim=-1).indices
        mask = torch.nn.functional.one_hot(top, probs.shape[-1]).sum(dim=-2).to(probs.dtype)
        probs = probs * mask
        if renormalize:
            probs = probs / probs.sum(dim=-1, keepdim=True)
    return torch.einsum("bse,bsed->bsd", probs, bax) * (alpha / rank)
