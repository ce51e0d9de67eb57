"""Timing: warm-up, then round-robin timed steps; medians, interquartile ranges, ratios.

nanoGPT's ``bench.py`` in spirit: warm-up steps, then timed steps, nothing else. The
contenders take turns (round robin, the starting contender rotating every repeat), so
background load falls on every method alike.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from harness.bench.contenders import Contender, SavedTensorMeter, eval_batch, install, train_step

if TYPE_CHECKING:
    from harness.bench.context import BenchContext


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(device: torch.device, n: int, fn: Callable[[], Any]) -> list[float]:
    """Seconds of each of ``n`` calls of ``fn``, bracketed by device synchronisation."""
    times = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _quantile(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    if len(s) == 1:
        return s[0]
    pos = q * (len(s) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _iqr(values: Sequence[float]) -> float:
    return _quantile(values, 0.75) - _quantile(values, 0.25)


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def time_round_robin(
    ctx: BenchContext,
    contenders: list[Contender],
    warmup: int,
    timed: int,
    repeats: int,
    eval_batches: int = 0,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Warm-up, then ``repeats`` rounds in which every contender runs ``timed`` timed steps
    (and ``eval_batches`` timed evaluation batches) in turn; the starting contender rotates."""
    model, device = ctx.model, ctx.device
    for c in contenders:
        install(ctx, c.layers)
        model.train()
        for w in range(max(warmup, 1)):
            if w == 0:
                meter = SavedTensorMeter(ctx.frozen_tensors)
                train_step(ctx, c, meter)
                c.saved_act_bytes = meter.bytes
            else:
                train_step(ctx, c)
        if eval_batches:
            model.eval()
            eval_batch(ctx, c)
            model.train()
    n = len(contenders)
    for rep in range(repeats):
        order = contenders[rep % n :] + contenders[: rep % n]
        for c in order:
            install(ctx, c.layers)
            model.train()
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            times = timed_calls(device, timed, lambda c=c: train_step(ctx, c))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                c.cuda_peak_bytes = max(c.cuda_peak_bytes or 0, peak)
            c.step_times.append(times)
            if eval_batches:
                model.eval()
                c.eval_times.append(timed_calls(device, eval_batches, lambda c=c: eval_batch(ctx, c)))
                model.train()
        if progress:
            progress(f"  round {rep + 1}/{repeats} done")
    install(ctx, ctx.original_layers)
    model.eval()


def _flat(per_repeat: list[list[float]]) -> list[float]:
    return [t for rep in per_repeat for t in rep]


def summarise(c: Contender) -> dict[str, float]:
    steps = _flat(c.step_times)
    out = {
        "step_ms_median": 1000 * statistics.median(steps),
        "step_ms_iqr": 1000 * _iqr(steps),
        "step_ms_min": 1000 * min(steps),
    }
    if c.eval_times:
        ev = _flat(c.eval_times)
        out["eval_ms_median"] = 1000 * statistics.median(ev)
    return out


def ratio_range(c: Contender, ref: Contender) -> tuple[float, float]:
    """Min and max over repeats of (median step of ``c`` / median step of ``ref``) in that repeat."""
    ratios = [
        statistics.median(a) / statistics.median(b) for a, b in zip(c.step_times, ref.step_times)
    ]
    return min(ratios), max(ratios)
