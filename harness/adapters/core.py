"""The block-gated low-rank core that every routed method is built on.

SMoRA (arXiv 2501.15103) observes that routing among ``E`` rank-``r`` LoRA experts
is the same as gating rank blocks of one rank-``E·r`` LoRA. With all experts'
down-projections stacked into ``A`` (``E·r x d_in``, rows ``e·r .. e·r+r-1``
belong to expert ``e``) and their up-projections into ``B`` (``d_out x E·r``,
same columns), a mixture is

    delta(x) = scaling · B (expand(g(x)) ⊙ A x)

where ``g(x)`` holds one gate per expert and ``expand`` repeats each gate over
its ``r`` rank rows. There is no loop over experts: one matmul down, one
elementwise gate, one matmul up.

Two execution paths compute the same function:

* :func:`dense_block_delta` multiplies all ``E·r`` ranks and zeroes the
  unselected blocks with the gate (fast when ``E·r`` is small);
* :func:`sparse_block_delta` gathers only the ``k`` selected blocks per token
  (less arithmetic when ``k·r << E·r``, at the cost of a gather).

:func:`choose_path` picks one from the measured crossover (see the benchmark).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: E·r / (k·r) at and above which the sparse path is chosen by ``path: auto``.
#: Measured by ``python -m harness bench`` (results/synthetic/bench/crossover.csv, SMoRA
#: with rank-1 experts, top-4, two CPU threads), after the dense path's router and
#: down-projection became one matmul: sparse / dense step time 1.77 at E/k = 4, 1.45 at
#: 64, 1.36 at 128 and 1.12 at 256 (the largest measured; 1.90 to 1.08 in another run);
#: the trend crosses 1 near 512, the value used. The dense path wins for every setting
#: of the default and paper studies (E/k <= 8). Rerun the benchmark on other hardware
#: (GPUs differ).
SPARSE_CROSSOVER_RATIO = 512


def expand_gate(gate: torch.Tensor, block_rank: int) -> torch.Tensor:
    """``(..., E)`` gates -> ``(..., E·r)``: each gate repeated over its block's ranks."""
    if block_rank == 1:
        return gate
    return gate.repeat_interleave(block_rank, dim=-1)


def dense_block_delta(
    h: torch.Tensor,
    gate: torch.Tensor | None,
    up: torch.Tensor,
    block_rank: int,
    scaling: float,
) -> torch.Tensor:
    """``scaling · B (expand(g) ⊙ h)`` for an already projected ``h = A x`` of shape ``(N, E·r)``.

    ``gate`` is ``(N, E)``, a per-expert vector ``(E,)`` broadcast over tokens, or
    ``None`` (all blocks with weight one, i.e. plain LoRA). The scale is applied to the
    ``E`` gates (or the ``E·r`` ranks), not to the ``d_out`` outputs: one multiply of a
    small tensor instead of the output-sized one, forward and backward.
    """
    if gate is None:
        return F.linear(h * scaling, up)
    n_blocks = h.shape[-1] // block_rank
    scaled = gate * scaling
    if block_rank == 1:
        return F.linear(h * scaled, up)
    h = (h.unflatten(-1, (n_blocks, block_rank)) * scaled.unsqueeze(-1)).flatten(-2)
    return F.linear(h, up)


def sparse_block_delta(
    x: torch.Tensor,
    down: torch.Tensor,
    up: torch.Tensor,
    index: torch.Tensor,
    weight: torch.Tensor,
    block_rank: int,
    scaling: float,
) -> torch.Tensor:
    """The same function, computing only the selected blocks.

    ``x``: ``(N, d_in)``; ``down``: ``(E·r, d_in)``; ``up``: ``(d_out, E·r)``;
    ``index``: ``(N, k)`` selected experts; ``weight``: ``(N, k)`` their gates.

    Down: the ``k·r`` selected rows of ``A`` per token, one batched matmul. Up: a
    weighted sum of the selected columns of ``B``, i.e. ``F.embedding_bag`` over the rows
    of ``Bᵀ`` with the gated ``h`` as per-sample weights (no ``(N, k, d_out, r)`` copy of
    ``B``; its gradient is an index-add into the selected rows only).
    """
    n, k = index.shape
    offsets = torch.arange(block_rank, device=index.device)
    rows = (index.unsqueeze(-1) * block_rank + offsets).reshape(n, k * block_rank)  # (N, k·r)
    h = torch.bmm(down[rows], x.unsqueeze(-1)).squeeze(-1)  # (N, k·r)
    h = h * expand_gate(weight * scaling, block_rank)
    return F.embedding_bag(rows, up.t(), per_sample_weights=h.to(up.dtype), mode="sum")


def choose_path(path: str, n_blocks: int, top_k: int | None) -> str:
    """Resolve ``"auto"`` to ``"dense"`` or ``"sparse"`` from the measured crossover."""
    if path in ("dense", "sparse"):
        if path == "sparse" and top_k is None:
            raise ValueError("the sparse path needs a top-k router; dense routing has no selection")
        return path
    if path != "auto":
        raise ValueError(f"execution path must be 'auto', 'dense' or 'sparse', got {path!r}")
    if top_k is None:
        return "dense"
    return "sparse" if n_blocks / top_k >= SPARSE_CROSSOVER_RATIO else "dense"
