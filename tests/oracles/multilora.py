"""MultiLoRA from the paper's equation (no official code to compare against).

Wang et al. 2023, "MultiLoRA: Democratizing LoRA for Better Multi-Task Learning",
arXiv 2311.11501 (Ant Group). No code was found (GitHub code and repository indexes,
Papers-with-Code / Hugging Face paper pages, survey lists of MoE-LoRA code; a GitHub
repository named "MultiLoRA" by a third party is unrelated; see docs/fidelity.md).

The formula, evaluated module by module (a Python loop, nothing stacked):
``n`` parallel rank-``r`` LoRAs, each with a learnable scale, summed:

    delta(x) = sum_i s_i · (alpha / r) · B_i A_i x
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SOURCE = {"repository": "none published", "paper": "arXiv 2311.11501"}


def multilora_delta(
    x: torch.Tensor,
    expert_As: list[torch.Tensor],
    expert_Bs: list[torch.Tensor],
    scales: torch.Tensor,
    *,
    alpha: float,
    r: int,
) -> torch.Tensor:
    """``sum_i s_i · (alpha / r) · B_i A_i x``: ``n`` parallel LoRAs, a learnable scale each."""
    out = 0
    for i, (a, b) in enumerate(zip(expert_As, expert_Bs)):
        out = out + scales[i] * (alpha / r) * F.linear(F.linear(x, a), b)
    return out
