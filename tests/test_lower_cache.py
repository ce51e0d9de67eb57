"""The frozen lower-layer cache gives exactly the numbers of the full-depth forward."""

from __future__ import annotations

from contextlib import nullcontext

import torch

from harness.adapters import get_method
from harness.adapters.inject import apply_method
from harness.model.load import adapted_layer_indices, target_shapes
from harness.model.lower_cache import (
    LowerCache,
    full_forward,
    logits_at,
    lower_forward,
    pad_batch,
    upper_forward,
)
from harness.run.train import Batcher, Example, answer_loss
from tests.conftest import make_tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _sequences(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 14, (n,), generator=g)
    return [torch.randint(1, 97, (int(k),), generator=g).tolist() for k in lengths]


def _adapted(method_name: str, **cfg):
    model = make_tiny_llama(layers=4)
    layers = adapted_layer_indices(model, {"top": 2})
    method = get_method(method_name)
    handle = apply_method(model, method, method.make_config(**cfg), target_shapes(model, TARGETS, layers))
    with torch.no_grad():  # trained-looking adapters, so the upper layers really differ from the base
        for name, p in model.named_parameters():
            if p.requires_grad and "lora_B" in name:
                p.normal_(0, 0.05)
    return model, handle, min(layers)


def test_split_forward_is_bitwise_the_full_depth_forward():
    """Lower layers then upper layers on the same batch: the very same numbers as one pass."""
    model, handle, start = _adapted("smora", num_experts=8, expert_rank=1, top_k=2)
    seqs = _sequences(12)
    ids, mask = pad_batch([seqs[i] for i in (3, 0, 7, 11, 5)], pad_id=0)
    model.eval()
    with torch.no_grad(), handle.token_mask(mask):
        full = full_forward(model, ids, mask)
        split = upper_forward(model, lower_forward(model, ids, mask, start), mask, start)
    assert torch.equal(full, split)


def test_training_step_from_the_split_equals_full_depth_loss_and_gradients():
    model, handle, start = _adapted("sira", num_experts=4, expert_rank=2, top_k=2, expert_dropout=0.0)
    seqs = _sequences(10, seed=1)
    examples = [Example(s, [len(s) - 2], [s[-1]], "t") for s in seqs]
    indices = [9, 2, 4, 6]
    ids, mask = pad_batch([seqs[i] for i in indices], pad_id=0)
    with torch.no_grad():
        lower = lower_forward(model, ids, mask, start)
    same_layout = LowerCache(
        torch.cat([lower[r, : len(seqs[i])] for r, i in enumerate(indices)]),
        torch.cumsum(torch.tensor([0] + [len(seqs[i]) for i in indices]), 0),
        start,
    )
    model.train()
    results = []
    for cache in (None, same_layout):
        batcher = Batcher(examples if cache is None else [examples[i] for i in indices], cache, 0, torch.device("cpu"))
        batch = batcher(indices if cache is None else [0, 1, 2, 3])
        loss = answer_loss(model, handle, batch, None if cache is None else start, nullcontext())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad()
        results.append((loss.detach(), grads))
    assert torch.equal(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        assert torch.equal(grad, results[1][1][name]), name


def test_cache_in_any_batch_layout_matches_running_each_sequence_to_float_rounding():
    """A cache is built in length-sorted batches; batching changes float32 results only at the
    rounding level (as any change of batch layout does), never more."""
    model, _, start = _adapted("molora", num_experts=4, expert_rank=2)
    seqs = _sequences(9, seed=4)
    cache = LowerCache.build(model, seqs, start, pad_id=0, batch_size=4)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            alone = lower_forward(model, torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long), start)[0]
            torch.testing.assert_close(cache.flat[cache.offsets[i] : cache.offsets[i + 1]], alone, rtol=1e-6, atol=1e-6)


def test_cache_round_trips_through_disk(tmp_path):
    model = make_tiny_llama(layers=3)
    seqs = _sequences(6, seed=2)
    cache = LowerCache.build(model, seqs, start=2, pad_id=0)
    cache.save(tmp_path / "c.safetensors")
    again = LowerCache.load(tmp_path / "c.safetensors")
    assert again.start == 2 and len(again) == 6
    assert torch.equal(cache.flat, again.flat)


def test_logits_only_at_requested_positions_match_full_head():
    model = make_tiny_llama()
    ids, mask = pad_batch(_sequences(3, seed=3), pad_id=0)
    with torch.no_grad():
        hidden = full_forward(model, ids, mask)
        all_logits = model.lm_head(hidden)
        rows, cols = torch.tensor([0, 2, 1]), torch.tensor([4, 1, 3])
        # a smaller matmul: equal up to float rounding, not bitwise
        torch.testing.assert_close(logits_at(model, hidden, rows, cols), all_logits[rows, cols])
