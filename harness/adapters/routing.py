"""Vectorised routing pieces shared by the routed methods (no loop over experts or tokens).

Everything here runs with tensor operations only: no ``.item()``, no ``int(tensor)``,
no boolean indexing, so nothing forces a GPU->host synchronisation in the routed hot
path (224 adapted modules a step at paper scale). Statistics (loads, shares) are
computed on detached tensors, off the autograd path.

Across data-parallel ranks (:mod:`harness.adapters.distributed`): the load shares, the
Switch-style loss's coefficients and :func:`load_balancing_loss` are those of the global
batch (counts summed over the ranks); one process is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.adapters.distributed import across_ranks, reduce_across_ranks, world_size


class TokenBatch:
    """What every routed layer of one forward needs to know about the batch's real tokens
    (the float mask, its count, SiRA's capacity, ...), computed by the first layer that
    asks and reused by the others: once per step, not once per adapted module.

    The handle makes one per forward (:meth:`AdapterHandle.token_mask`); a layer called
    on its own makes a private one. ``mask``: flat bool over the ``N`` tokens, or ``None``
    (all real).
    """

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask
        self._memo: dict[tuple, torch.Tensor] = {}

    def memo(self, key: tuple, make) -> torch.Tensor:
        """``make()`` the first time ``key`` is asked for, the same tensor afterwards."""
        value = self._memo.get(key)
        if value is None:
            value = self._memo[key] = make()
        return value

    def weights(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        """``(N,)`` float32: 1 for a real token, 0 for padding."""
        if self.mask is None:
            return self.memo(("ones", n_tokens, device), lambda: torch.ones(n_tokens, device=device))
        return self.memo(("weights",), lambda: self.mask.to(torch.float32))

    def count(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        """The number of real tokens, a 0-d float32 tensor (on the device, no sync)."""
        return self.memo(("count", n_tokens), lambda: self.weights(n_tokens, device).sum())

    def by_choice(self, n_tokens: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """For ``k`` choices per token in choice-rank-major order (``k·N``): the weights
        ``(1, k·N)`` (1 real, 0 padding) and an offset that is 0 for a real token and
        ``inf`` for padding (so padding never fits a capacity)."""
        def make():
            valid = self.weights(n_tokens, device).repeat(k).view(1, k * n_tokens)
            return torch.stack([valid, torch.zeros_like(valid).masked_fill(valid == 0, float("inf"))])
        both = self.memo(("by_choice", n_tokens, k), make)
        return both[0], both[1]


@dataclass
class Routing:
    """A router's decision for ``N`` tokens.

    Either ``gate`` (``(N, E)`` per-token gates, or ``(E,)`` shared by all tokens)
    or ``index``/``weight`` (``(N, k)`` selected experts and their gates) or both.
    ``load``: share of the batch's routing each expert received (``(E,)``, sums to 1);
    ``None`` lets the layer compute it from ``index``/``keep`` (or the gate) only when it
    is asked for (the training log reads it every few steps). ``keep`` (``(N, k)`` bool):
    which selections happened (capacity).
    """

    gate: torch.Tensor | None = None
    index: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    load: torch.Tensor | None = None
    keep: torch.Tensor | None = None

    def dense_gate(self, n_experts: int) -> torch.Tensor | None:
        if self.gate is None and self.index is not None:
            self.gate = scatter_gate(self.index, self.weight, n_experts)
        return self.gate

    def expert_load(self, n_experts: int, token_mask: torch.Tensor | None) -> torch.Tensor | None:
        """``load`` if the router gave one, else the share of assignments (top-k) or of the
        mean gate (dense, per-token gates); ``None`` for a gate shared by all tokens."""
        if self.load is not None:
            return self.load
        if self.index is not None:
            return selection_share(self.index, n_experts, token_mask, self.keep)
        if self.gate is not None and self.gate.dim() == 2:
            return soft_share(self.gate, token_mask)
        return None

    def token_shares(self, n_experts: int) -> torch.Tensor | None:
        """Each token's expert shares, ``(N, E)`` float32, rows summing to 1: a top-k token
        splits its share equally among the experts it was really routed to (capacity
        drops count as not routed); a dense per-token gate is normalised by its absolute
        sum. ``None`` when the routing does not depend on the token (shared gate)."""
        if self.index is not None:
            ones = torch.ones(self.index.shape, dtype=torch.float32, device=self.index.device)
            if self.keep is not None:
                ones = ones * self.keep
            counts = torch.zeros(
                self.index.shape[0], n_experts, dtype=torch.float32, device=self.index.device
            ).scatter_add_(1, self.index, ones)
            return (counts / counts.sum(-1, keepdim=True).clamp_min(1.0)).detach()
        if self.gate is not None and self.gate.dim() == 2:
            g = self.gate.detach().float().abs()
            return g / g.sum(-1, keepdim=True).clamp_min(1e-12)
        return None


def topk_softmax(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` experts, gates = softmax over the ``k`` selected logits: ``(index, weight)``.

    With ``k = 1`` that softmax is the constant 1 and the router would never
    receive a gradient through the output, so the selected expert's probability
    under the softmax over *all* experts is used instead (Switch Transformer's
    top-1 gate, Fedus et al. 2021).
    """
    if k == 1:
        index = logits.detach().argmax(dim=-1, keepdim=True)  # top-1 without topk's partial sort
        return index, torch.softmax(logits, dim=-1).gather(1, index)
    values, index = logits.topk(k, dim=-1)
    return index, torch.softmax(values, dim=-1)


def routing_dtype(logits: torch.Tensor) -> torch.dtype:
    """Float32 for routing arithmetic (float64 stays float64): bf16 logits are upcast."""
    return torch.promote_types(logits.dtype, torch.float32)


class _TopKGate(torch.autograd.Function):
    """:func:`topk_gate`'s forward and its gradient by hand: one autograd node instead of
    the ten or so a top-k softmax, a mask, a scatter and a Switch loss make (each a fixed
    cost per adapted module per step)."""

    @staticmethod
    def forward(ctx, logits, index, gate_mask, token_weights, aux_coef):
        lf = logits.to(routing_dtype(logits))
        top1 = index.shape[1] == 1
        probs = torch.softmax(lf, dim=-1) if (top1 or aux_coef is not None) else None
        y = probs.gather(1, index) if top1 else torch.softmax(lf.gather(1, index), dim=-1)
        gate = torch.zeros_like(lf).scatter_(1, index, y * gate_mask)
        aux = s = None
        if aux_coef is not None:
            s = probs.mv(aux_coef)  # (N,): sum_e p_te a_e
            aux = torch.dot(token_weights, s)
        ctx.save_for_backward(index, gate_mask, y, probs, s, token_weights, aux_coef)
        ctx.top1, ctx.dtype = top1, logits.dtype
        ctx.mark_non_differentiable(index)
        return gate, aux if aux is not None else lf.new_zeros(())

    @staticmethod
    def backward(ctx, grad_gate, grad_aux):
        index, gate_mask, y, probs, s, w, a = ctx.saved_tensors
        g_y = grad_gate.gather(1, index) * gate_mask if grad_gate is not None else torch.zeros_like(y)
        if ctx.top1:  # y = p_sel: d/dl = p * (onehot * g_y - y g_y)
            grad = probs * (torch.zeros_like(probs).scatter_(1, index, g_y) - y * g_y)
        else:  # y = softmax over the selected logits
            g_v = y * (g_y - (y * g_y).sum(-1, keepdim=True))
            grad = torch.zeros(grad_gate.shape, dtype=y.dtype, device=y.device).scatter_(1, index, g_v)
        if a is not None and grad_aux is not None:
            grad = grad + (grad_aux * w).unsqueeze(-1) * probs * (a.unsqueeze(0) - s.unsqueeze(-1))
        return grad.to(ctx.dtype), None, None, None, None


def topk_index(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` largest logits' experts per token, ``(N, k)``, best first (no gradient)."""
    logits = logits.detach()
    return logits.argmax(dim=-1, keepdim=True) if k == 1 else logits.topk(k, dim=-1).indices


def topk_gate(
    logits: torch.Tensor,
    index: torch.Tensor,
    gate_mask: torch.Tensor,
    token_weights: torch.Tensor | None = None,
    aux_coef: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense ``(N, E)`` gate of a top-``k`` router and, optionally, a Switch-style loss,
    as one autograd node (float32 inside):

        gate[t, index[t, j]] = y_tj · gate_mask_tj,   y = softmax over the k selected logits
                                                      (k = 1: the full-softmax probability)
        aux = sum_t w_t sum_e p_te a_e               (p: softmax over all E logits)

    ``gate_mask`` (``(N, k)``, no gradient): capacity drops and dropout; ``aux_coef`` ``a``
    (``(E,)``): e.g. ``E · f_e / n`` for Switch's ``E · sum_e f_e P_e`` with ``w`` the token
    mask (:func:`load_balancing_loss_from_counts` spells it out). Same values and gradients
    as the composition of :func:`topk_softmax`, a multiply, :func:`scatter_gate` and the
    loss (tests/test_methods.py checks both).
    """
    dtype = routing_dtype(logits)
    if aux_coef is not None and token_weights is None:
        token_weights = torch.ones(logits.shape[0], device=logits.device)
    gate, aux = _TopKGate.apply(
        logits, index, gate_mask.to(dtype),
        None if aux_coef is None else token_weights.to(dtype),
        None if aux_coef is None else aux_coef.to(dtype),
    )
    return gate, (aux if aux_coef is not None else None)


def scatter_gate(index: torch.Tensor, weight: torch.Tensor, n_experts: int) -> torch.Tensor:
    """``(N, k)`` selected experts and their gates -> dense ``(N, E)`` gate, zero elsewhere."""
    gate = torch.zeros(index.shape[0], n_experts, dtype=weight.dtype, device=weight.device)
    return gate.scatter(1, index, weight)


def _valid(index: torch.Tensor, token_mask: torch.Tensor | None, keep: torch.Tensor | None) -> torch.Tensor:
    """``(N, k)`` float32 weights: 1 for assignments that happened on real tokens, else 0."""
    valid = torch.ones(index.shape, dtype=torch.float32, device=index.device)
    if keep is not None:
        valid = valid * keep
    if token_mask is not None:
        valid = valid * token_mask.unsqueeze(-1)
    return valid


def selection_counts(
    index: torch.Tensor,
    n_experts: int,
    token_mask: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Number of real tokens that selected each expert, ``(E,)`` float32 (no host sync)."""
    counts = torch.zeros(n_experts, dtype=torch.float32, device=index.device)
    return counts.index_add_(0, index.detach().reshape(-1), _valid(index, token_mask, keep).reshape(-1))


def selection_share(
    index: torch.Tensor,
    n_experts: int,
    token_mask: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Share of the batch's token-to-expert assignments each expert received, ``(E,)``, sums to 1.

    ``keep`` (``(N, k)`` bool) drops assignments that did not happen (capacity);
    masked tokens (padding) do not count. Under several ranks: the share over the global
    batch (the counts are summed over the ranks).
    """
    counts = reduce_across_ranks(selection_counts(index, n_experts, token_mask, keep))
    return counts / counts.sum().clamp_min(1.0)


def masked_mean(values: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` (``(N, ...)``) over the real tokens (all tokens without a mask);
    zero when no token is real. A weighted sum, not a boolean index: no host sync."""
    if token_mask is None:
        return values.mean(0)
    w = token_mask.to(values.dtype).reshape(-1, *([1] * (values.dim() - 1)))
    return (values * w).sum(0) / w.sum().clamp_min(1.0)


def soft_share(gate: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean gate per expert over real tokens, normalised to sum to 1 (dense routing); over
    the global batch under several ranks."""
    g = gate.detach().float()
    if world_size() > 1:
        w = torch.ones(g.shape[0], device=g.device) if token_mask is None else token_mask.float()
        g = reduce_across_ranks((g * w.unsqueeze(-1)).sum(0))
    else:
        g = masked_mean(g, token_mask)
    return g / g.sum().clamp_min(1e-12)


def real_tokens(n_tokens: int, token_mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The number of real tokens as a 0-d float tensor (stays on the device)."""
    if token_mask is None:
        return torch.tensor(float(n_tokens), device=device)
    return token_mask.sum().float()


def expert_capacity(
    capacity_factor: float, top_k: int, n_tokens: torch.Tensor, n_experts: int
) -> torch.Tensor:
    """SiRA's per-expert capacity ``ceil(cf · k · T / E)`` tokens per batch (``T``: a tensor
    of real tokens, so the capacity stays on the device; float64 like Python's arithmetic,
    so an exact multiple is not pushed over by rounding)."""
    return torch.ceil(capacity_factor * top_k * n_tokens.double() / n_experts)


def assignment_slots(
    index: torch.Tensor,
    n_experts: int,
    token_mask: torch.Tensor | None,
    tokens: TokenBatch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each assignment's 1-based place in its expert's queue, ``(N, k)`` float (``inf``
    for padding, which takes no place), and the real assignments per expert, ``(E,)``.

    Queue order (as in GShard): every token's first choice before any token's second
    choice; within one choice rank, earlier tokens (flattened batch order) first. One
    scatter and one running sum over an ``E x k·N`` table.
    """
    n, k = index.shape
    tokens = tokens if tokens is not None else TokenBatch(token_mask)
    valid, pad = tokens.by_choice(n, k, index.device)
    flat = index.detach().t().reshape(1, k * n)  # choice rank major
    running = torch.zeros(n_experts, k * n, device=index.device).scatter_(0, flat, valid).cumsum(1)
    slots = running.gather(0, flat) + pad
    return slots.view(k, n).t(), running[:, -1]  # (N, k) as a transposed view


def capacity_keep(
    index: torch.Tensor,
    n_experts: int,
    capacity: torch.Tensor | int,
    token_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Which assignments fit in their expert's capacity, ``(N, k)`` bool, in the queue order
    of :func:`assignment_slots`. Masked tokens neither consume capacity nor are kept."""
    slots, _ = assignment_slots(index, n_experts, token_mask)
    return slots <= capacity


def load_balancing_loss(
    probs: torch.Tensor,
    index: torch.Tensor,
    token_mask: torch.Tensor | None,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Switch Transformer's auxiliary loss (Fedus et al. 2021, eq. 4), generalised to top-k:

        L_aux = E · sum_e f_e · P_e

    ``f_e``: share of assignments routed to expert ``e`` (without ``keep``: the router's
    choices, before capacity); ``P_e``: mean router probability of ``e`` over real tokens.
    Equals 1 under perfect balance. Under several ranks both are the global batch's
    (:func:`~harness.adapters.distributed.across_ranks`).
    """
    n_experts = probs.shape[-1]
    f = selection_share(index, n_experts, token_mask, keep).to(probs.dtype)
    if world_size() == 1:
        return n_experts * torch.sum(f * masked_mean(probs, token_mask))
    w = torch.ones(probs.shape[0], dtype=probs.dtype, device=probs.device) if token_mask is None \
        else token_mask.to(probs.dtype)
    return across_ranks(
        lambda p_sum, n: n_experts * torch.sum(f * p_sum) / n.clamp_min(1.0),
        probs.t().mv(w), w.sum(),
    )


def switch_coefficients(
    counts: torch.Tensor, top_k: int, tokens: TokenBatch, n_tokens: int, weight: float = 1.0
) -> torch.Tensor:
    """``a_e = weight · E · counts_e / (k n²)``: Switch's loss is then ``sum_t w_t sum_e p_te a_e``
    (see :func:`load_balancing_loss_from_counts`); the scalar factor is shared by the forward's layers.

    Under ``N`` ranks ``counts`` and ``n`` are the global batch's and ``a`` is multiplied by
    ``N``: each rank's loss is ``N`` times its tokens' part of the global loss, so DDP's
    average of the ranks' gradients (and the mean of their values) is the global loss's."""
    n_experts = counts.shape[0]
    factor = tokens.memo(
        ("switch", n_tokens, n_experts, top_k, weight),
        lambda: weight * n_experts * world_size()
        / (top_k * reduce_across_ranks(tokens.count(n_tokens, counts.device)) ** 2).clamp_min(1.0),
    )
    return reduce_across_ranks(counts) * factor


def load_balancing_loss_from_counts(
    probs: torch.Tensor, counts: torch.Tensor, top_k: int, tokens: TokenBatch, weight: float = 1.0
) -> torch.Tensor:
    """:func:`load_balancing_loss` (before capacity) from the per-expert assignment
    ``counts`` of :func:`assignment_slots`. With ``n`` real tokens, ``f_e = counts_e / (k n)``
    and ``P_e = sum_t w_t p_te / n``, so

        L_aux = E · sum_e f_e P_e = E / (k n²) · counts · (Pᵀ w)

    (one matrix-vector product over the tokens), times the loss ``weight``; the factor is
    computed once per forward and shared by its layers.
    """
    n_tokens = probs.shape[0]
    w = tokens.weights(n_tokens, probs.device).to(probs.dtype)
    coef = switch_coefficients(counts, top_k, tokens, n_tokens, weight)
    return torch.dot(coef.to(probs.dtype), probs.t().mv(w))


@dataclass
class RoutingRecord:
    """Where each task's tokens went during one evaluation.

    ``shares[module][task]``: the mean, over the task's scored sequences, of each
    sequence's expert shares averaged over its real tokens (a list of ``E`` numbers
    summing to 1; :meth:`Routing.token_shares` per token). ``sequences[task]``: how many
    sequences of the task were scored. ``active[module][task]``: how many experts a real
    token was routed to, averaged over each sequence's tokens, then over the task's
    sequences (a threshold router's varying count; ``G`` for a dense soft router). Every
    sequence weighs the same, whatever its length.
    """

    shares: dict[str, dict[str, list[float]]]
    sequences: dict[str, int]
    active: dict[str, dict[str, float]] | None = None

    def experts_per_token(self) -> float | None:
        """The experts a token was routed to, averaged over the scored sequences (tasks
        weighted by their number of sequences) and over the modules."""
        if not self.active:
            return None
        values = []
        for by_task in self.active.values():
            total = sum(self.sequences.get(t, 0) for t in by_task)
            values.append(sum(self.sequences.get(t, 0) * v for t, v in by_task.items()) / max(total, 1))
        return sum(values) / len(values)

    def pooled(self, module: str) -> list[float]:
        """The module's expert shares over every scored sequence (tasks weighted by their
        number of sequences)."""
        by_task = self.shares[module]
        total = sum(self.sequences.get(t, 0) for t in by_task)
        width = len(next(iter(by_task.values())))
        return [
            sum(self.sequences.get(t, 0) * s[e] for t, s in by_task.items()) / max(total, 1)
            for e in range(width)
        ]

    def effective_experts(self) -> float | None:
        """``exp(H(p))`` of each module's pooled expert distribution ``p``, averaged over the
        modules: the number of equally used experts with the same entropy (``G`` when every
        expert gets the same share, 1 when one expert takes everything)."""
        values = []
        for module in self.shares:
            p = torch.tensor(self.pooled(module), dtype=torch.float64)
            p = p[p > 0]
            values.append(float(torch.exp(-(p * p.log()).sum())))
        return sum(values) / len(values) if values else None
