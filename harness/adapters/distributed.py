"""Routing statistics across data-parallel ranks: the one service a method calls so that a
run on ``N`` ranks (``train.processes``, torchrun) steers its routers as the one-process
run of the same global batch does.

DDP averages the gradients of the ranks' losses; it does not see what a router computes
outside autograd (SMoRA's expert loads before its bias update, the load shares of a
Switch-style loss, a running statistic) nor a loss that is not a mean over equal shards
(a coefficient of variation over the whole batch, a mean over a varying number of real
tokens). For those:

* :func:`reduce_across_ranks` — the sum of a (detached) tensor over the ranks;
* :func:`across_ranks` — ``fn`` of sums over the whole global batch, with the gradient
  that DDP's average turns into the gradient of the one-process ``fn``;
* :func:`world_size` — how many ranks share the global batch.

All three are the identity (one rank) when ``torch.distributed`` is not initialised: in
one process, in evaluation, in a plugin's unit test. Capacity (SiRA) is decided per rank,
as GShard and Switch do; :func:`simulated_shards` lets one process decide it per shard of
its batch, the one-process reference of an ``N``-rank run (docs/cluster.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

_SIMULATED_SHARDS = 1


def world_size() -> int:
    """The number of data-parallel ranks (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def reduce_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of ``tensor`` over the ranks, as a new detached tensor (the
    tensor itself, detached, on one rank). Every rank must call it, in the same order."""
    tensor = tensor.detach()
    if world_size() == 1:
        return tensor
    total = tensor.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def across_ranks(fn: Callable[..., torch.Tensor], *local_sums: torch.Tensor) -> torch.Tensor:
    """``fn`` of the global batch's sums, given this rank's sums (each a sum over its
    shard: a count, a sum of values, a sum of squares).

    Guarantees: the value is ``fn(global sums)`` on every rank; the gradient w.r.t. the
    local sums is ``N · ∂fn/∂S`` at the global sums, so DDP's average of the ranks'
    gradients equals the gradient of ``fn`` computed in one process over the whole batch.
    One rank: exactly ``fn(*local_sums)``.
    """
    n = world_size()
    if n == 1:
        return fn(*local_sums)
    return fn(*[reduce_across_ranks(s) + n * (s - s.detach()) for s in local_sums])


def shards() -> int:
    """How many equal shards of the local batch make per-shard decisions (capacity): 1
    under torchrun (each rank holds one shard), ``n`` inside :func:`simulated_shards`."""
    return _SIMULATED_SHARDS


@contextmanager
def simulated_shards(n: int) -> Iterator[None]:
    """In one process: decide per-shard quantities (SiRA's capacity) over ``n`` equal
    consecutive shards of each batch, as ``n`` ranks would; the reference an ``N``-rank run
    is compared with."""
    global _SIMULATED_SHARDS
    if world_size() > 1 and n != 1:
        raise RuntimeError("simulated_shards is for one process; under torchrun each rank is a shard")
    previous, _SIMULATED_SHARDS = _SIMULATED_SHARDS, int(n)
    try:
        yield
    finally:
        _SIMULATED_SHARDS = previous


__all__ = ["across_ranks", "reduce_across_ranks", "shards", "simulated_shards", "world_size"]
