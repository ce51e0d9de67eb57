"""Running a causal LM in two parts: frozen lower layers (computed once, cached) and the
adapted upper layers (run every step).

Only the top decoder layers carry adapters, so everything below the first
adapted layer is a fixed function of the input tokens. :class:`LowerCache`
stores the hidden states entering that layer for every training (or evaluation)
sequence; :func:`upper_forward` runs the remaining layers from them. The
result is the same computation as the full-depth forward, in the same order,
so the numbers are identical (``tests/test_split.py`` checks bitwise equality).

Logits are computed only where a loss or a score is needed (:func:`logits_at`):
the output head (vocabulary x hidden) over every position is a large share of
a CPU step otherwise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from harness.model.load import decoder_layers


@contextlib.contextmanager
def layer_range(model: nn.Module, start: int, end: int, final_norm: bool) -> Iterator[None]:
    """Temporarily keep only decoder layers ``start:end`` (and the final norm if asked)."""
    inner = model.model
    layers, norm = inner.layers, inner.norm
    inner.layers = nn.ModuleList(list(layers)[start:end])
    if not final_norm:
        inner.norm = nn.Identity()
    try:
        yield
    finally:
        inner.layers = layers
        inner.norm = norm


def lower_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Hidden states entering decoder layer ``start`` (the embeddings when ``start == 0``)."""
    with layer_range(model, 0, start, final_norm=False):
        out = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def upper_forward(
    model: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor, start: int
) -> torch.Tensor:
    """Final (normed) hidden states from the states entering layer ``start``."""
    n = len(decoder_layers(model))
    with layer_range(model, start, n, final_norm=True):
        out = model.model(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)
    return out.last_hidden_state


def full_forward(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    return model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def logits_at(model: nn.Module, hidden: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Output-head logits at the positions ``(rows[i], cols[i])`` only: ``(len(rows), vocab)``."""
    return model.lm_head(hidden[rows, cols])


def pad_batch(
    sequences: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention_mask)``; right padding keeps every real token's
    position, so causal attention gives real tokens the same values as unpadded."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


class LowerCache:
    """Hidden states entering layer ``start`` for a list of sequences (flat, with offsets)."""

    def __init__(self, flat: torch.Tensor, offsets: torch.Tensor, start: int):
        self.flat = flat
        self.offsets = offsets
        self.start = start
        #: whether the job that holds it built it (True) or loaded another job's (False)
        self.built_here = False

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(hidden, attention_mask)`` for the given sequence indices."""
        lengths = [int(self.offsets[i + 1] - self.offsets[i]) for i in indices]
        longest = max(lengths)
        hidden = self.flat.new_zeros((len(indices), longest, self.flat.shape[-1]))
        mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, (i, n) in enumerate(zip(indices, lengths)):
            hidden[row, :n] = self.flat[self.offsets[i] : self.offsets[i + 1]]
            mask[row, :n] = 1
        return hidden, mask

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        sequences: Sequence[Sequence[int]],
        start: int,
        pad_id: int,
        batch_size: int = 32,
        desc: str = "lower layers",
    ) -> LowerCache:
        from tqdm.auto import tqdm

        was_training = model.training
        model.eval()
        chunks: list[torch.Tensor | None] = [None] * len(sequences)
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        device = next(model.parameters()).device  # the cache itself is kept on the CPU
        for b in tqdm(range(0, len(order), batch_size), desc=desc, mininterval=2, leave=False):
            idx = order[b : b + batch_size]
            ids, mask = pad_batch([sequences[i] for i in idx], pad_id)
            hidden = lower_forward(model, ids.to(device), mask.to(device), start)
            for row, i in enumerate(idx):
                part = hidden[row, : len(sequences[i])]
                chunks[i] = part.clone() if part.device.type == "cpu" else part.cpu()
        model.train(was_training)
        lengths = torch.tensor([0] + [len(s) for s in sequences])
        return cls(torch.cat(chunks), torch.cumsum(lengths, 0), start)

    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        tmp = path.with_name(path.name + ".tmp")
        save_file(
            {"flat": self.flat.contiguous(), "offsets": self.offsets},
            str(tmp),
            metadata={"start": str(self.start)},
        )
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> LowerCache:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            start = int(f.metadata()["start"])
            return cls(f.get_tensor("flat"), f.get_tensor("offsets"), start)


@contextlib.contextmanager
def every_core() -> Iterator[None]:
    """Run torch on every core this process may use, then restore its thread count. The
    one-time cache build holds a file lock that the study's other jobs wait on, so its
    cores would otherwise idle (a job trains on ``train.threads``, 1 by default)."""
    before = torch.get_num_threads()
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(max(before, usable))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def model_fingerprint(model_path: Path, dtype: torch.dtype) -> str:
    """Identifies a checkpoint without hashing gigabytes: config, weight file names and sizes."""
    parts = {"dtype": str(dtype), "config": (model_path / "config.json").read_text()}
    parts["weights"] = sorted(
        (p.name, p.stat().st_size) for p in model_path.glob("*.safetensors")
    )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def cached_lower(
    model: nn.Module,
    fingerprint: str,
    sequences: Sequence[Sequence[int]],
    start: int,
    pad_id: int,
    cache_dir: Path,
    desc: str,
) -> LowerCache:
    """Load the cache for these sequences if another job built it, else build and store it."""
    from filelock import FileLock

    key = hashlib.sha256(
        json.dumps({"model": fingerprint, "start": start, "seqs": list(map(list, sequences))}).encode()
    ).hexdigest()[:20]
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"lower-{key}.safetensors"
    with FileLock(str(path) + ".lock"):
        if path.exists():
            cache = LowerCache.load(path)
            cache.built_here = False
            return cache
        with every_core():
            cache = LowerCache.build(model, sequences, start, pad_id, desc=desc)
        cache.save(path)
        cache.built_here = True  # this job paid the one-time build (reported on its own)
        return cache
