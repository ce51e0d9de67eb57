"""``python -m harness bench``: what a training step and an evaluation batch cost, per method.

The package, one module per job: :mod:`~harness.bench.options` (settings),
:mod:`~harness.bench.context` (model and batches), :mod:`~harness.bench.contenders`,
:mod:`~harness.bench.timing`, the experiments (:mod:`~harness.bench.main`,
:mod:`~harness.bench.crossover`, :mod:`~harness.bench.scaling`,
:mod:`~harness.bench.eval_cache`) and :mod:`~harness.bench.report`.

Everything is measured in **one process**, on one base model, one batch and one
sequence length, through the code the study itself runs:

* a training step is :func:`harness.run.train.answer_loss` (upper layers from the
  cached lower hidden states, logits only at the answer positions) plus the
  method's auxiliary loss, backward, gradient clipping, AdamW, the scheduler and
  ``handle.after_optimizer_step()`` — the calls and order of
  :func:`harness.run.train.train_run`, with adapters inserted by
  :func:`harness.adapters.apply_method`;
* an evaluation batch is :func:`harness.model.lm_eval_model.score_logprobs` in eval mode
  (the forward that lm-eval's requests go through in :class:`~harness.model.lm_eval_model.HarnessLM`).

The base model is loaded once. Each contender (a method at one variant) gets its
own copy of the adapted decoder layers — the frozen weights are shared, not
copied — and is swapped into the model while it runs. After warm-up steps, the
contenders take turns (round robin, the starting contender rotating every
repeat), so background load falls on every method alike; absolute times vary
between machines and runs, **the ratios to peft's LoRA at rank R measured in the
same run are the result**.

Sections (all written under ``{out}/bench/``):

``bench.csv`` / ``bench.md``
    per (method, variant) of the study's plan (one seed) plus both peft LoRA
    references: step time (median, interquartile range), its ratio to LoRA rank
    R (and the range of that ratio over repeats), real tokens per second,
    evaluation batch time and sequences per second, memory.
``cache.csv``
    LoRA rank R trained at full depth vs from the frozen lower-layer cache: step
    times, speed-up, and the largest difference between the two runs' losses
    (same initial weights, same batches: it must be 0 up to float tolerance).
``crossover.csv``
    dense block-gated vs sparse (gathered) execution at growing expert counts
    with a fixed active rank; the smallest ratio ``experts / top-k`` at which the
    sparse path wins is what :data:`harness.adapters.core.SPARSE_CROSSOVER_RATIO`
    records.
``scaling.csv`` / ``scaling.png`` / ``scaling.pdf``
    step time against the number of experts (fixed total rank) and against the
    total rank (fixed number of experts) for every routed method whose number of
    experts is free (not one fixed by the method, e.g. one per task), with peft LoRA as the
    reference line.
``eval_cache.csv``
    one real evaluation (lm-eval on the study's task folder) with the shared
    evaluation lower-layer cache (first run of a study: builds it; later runs:
    reuse it) and without it (full depth every run), after an untimed warm-up evaluation,
    extrapolated to the study.

Memory: on CUDA, ``torch.cuda.max_memory_allocated`` per contender (reset before
its timed steps). On CPU there is no per-tensor allocator counter, so each row
reports the bytes a contender adds — adapter parameters, their gradients and the
AdamW state (``state_mb``) and the activations autograd saved for backward in
one step (``saved_act_mb``, distinct storages, frozen weights excluded) — and
the process's peak resident set size (``ru_maxrss``) is reported once.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from harness.bench.contenders import note
from harness.bench.context import BenchContext, build_context
from harness.bench.crossover import bench_crossover, crossover_point
from harness.bench.eval_cache import bench_eval_cache
from harness.bench.main import bench_main, plan_contenders
from harness.bench.options import BenchOptions
from harness.bench.report import device_words, write_csv, write_report
from harness.bench.scaling import bench_scaling, plot_scaling, scaling_points
from harness.bench.timing import load_average

__all__ = [
    "BenchContext",
    "BenchOptions",
    "bench_main",
    "build_context",
    "crossover_point",
    "plan_contenders",
    "run_bench",
    "scaling_points",
]


def run_bench(
    config: dict[str, Any],
    out: Path | None = None,
    log: Callable[[str], None] = print,
    **overrides: Any,
) -> dict[str, Any]:
    """Run every section and write the files; returns the rows of each section."""
    wall = time.perf_counter()
    options = BenchOptions.from_config(config, **overrides)
    out = Path(out) if out is not None else Path(config["out_dir"]) / "bench"
    out.mkdir(parents=True, exist_ok=True)
    threads_before = torch.get_num_threads()
    try:
        load_before = load_average()
        ctx = build_context(config, options)
        log(f"bench: {device_words(ctx)}; {ctx.notes[0]}")
        main_rows, cache = bench_main(ctx, log)
        write_csv(main_rows, out / "bench.csv")
        if cache:
            write_csv([cache], out / "cache.csv")
        crossover_rows = bench_crossover(ctx, log) if options.crossover else []
        write_csv(crossover_rows, out / "crossover.csv")
        scaling_rows = bench_scaling(ctx, log) if options.scaling else []
        if scaling_rows:
            write_csv(scaling_rows, out / "scaling.csv")
            plot_scaling(scaling_rows, out)
        eval_cache = bench_eval_cache(ctx, log, out / ".eval_cache_work") if options.eval_cache else None
        if eval_cache:
            write_csv([eval_cache], out / "eval_cache.csv")
        if load_before is not None:
            # other work on the machine: with more busy threads than cores, OpenMP's waiting
            # threads can make a step many times slower (ratios then mean little)
            note(ctx, f"machine: {os.cpu_count()} CPUs; 1-minute load average {load_before:.2f} at the "
                      f"start, {load_average():.2f} at the end (this process adds up to {options.threads})")
        text = write_report(ctx, out, main_rows, cache, crossover_rows, scaling_rows, eval_cache,
                            time.perf_counter() - wall)
        log(text)
    finally:
        torch.set_num_threads(threads_before)
    return {
        "main": main_rows,
        "cache": cache,
        "crossover": crossover_rows,
        "scaling": scaling_rows,
        "eval_cache": eval_cache,
        "out": out,
    }
