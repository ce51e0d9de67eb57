"""``python -m harness bench``: what a training step and an evaluation batch cost, per method.

Everything is measured in **one process**, on one base model, one batch and one
sequence length, through the code the study itself runs:

* a training step is :func:`harness.train.answer_loss` (upper layers from the
  cached lower hidden states, logits only at the answer positions) plus the
  method's auxiliary loss, backward, gradient clipping, AdamW, the scheduler and
  ``handle.after_optimizer_step()`` — the calls and order of
  :func:`harness.train.train_run`, with adapters inserted by
  :func:`harness.methods.inject.apply_method`;
* an evaluation batch is :func:`harness.lm_model.score_logprobs` in eval mode
  (the forward that lm-eval's requests go through in :class:`~harness.lm_model.HarnessLM`).

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
    sparse path wins is what :data:`harness.methods.core.SPARSE_CROSSOVER_RATIO`
    records.
``scaling.csv`` / ``scaling.png`` / ``scaling.pdf``
    step time against the number of experts (fixed total rank) and against the
    total rank (fixed number of experts) for every routed method whose number of
    experts is free (not MoA's: one per task), with peft LoRA as the reference line.
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

import copy
import csv
import dataclasses
import gc
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

# -- settings -----------------------------------------------------------------------------


@dataclass
class BenchOptions:
    """The ``bench:`` section of a study config (``harness/config_schema.yaml``, same defaults)."""

    warmup_steps: int = 3
    timed_steps: int = 10
    repeats: int = 3
    batch_size: int | None = None
    seq_len: int | None = None
    threads: int = 2
    sweep_steps: int = 4
    sweep_repeats: int = 2
    crossover_experts: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    crossover_method: str = "smora"
    eval_batches: int = 3
    crossover: bool = True
    scaling: bool = True
    eval_cache: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> BenchOptions:
        """``bench:`` of a (validated) study config, then command-line ``overrides`` (None: unset);
        every value is checked (:meth:`check`), so a bad one stops before the model loads."""
        values = dict(config.get("bench") or {})  # unset keys: the defaults below (= the schema's)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise _bench_error(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                               f"{', '.join(sorted(known))}")
        options = cls(**values)
        options.check(config)
        return options

    def check(self, config: dict[str, Any] | None = None) -> None:
        """Refuse values the benchmark cannot run with; the message names the key and what is valid.

        With the study ``config``: ``crossover_method`` must be a registered routed method
        with a top-k router (the sparse path gathers the selected blocks), and at least one
        of ``crossover_experts`` must exceed the active rank K (top-k is K there)."""
        minimum = {
            "warmup_steps": 0, "timed_steps": 1, "repeats": 1, "threads": 1, "sweep_steps": 1,
            "sweep_repeats": 1, "eval_batches": 1, "batch_size": 1, "seq_len": 4,
        }
        for key, low in minimum.items():
            value = getattr(self, key)
            if value is None and key in ("batch_size", "seq_len"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise _bench_error(f"{key} = {value!r} is not valid; expected an integer >= {low}")
        for key in ("crossover", "scaling", "eval_cache"):
            if not isinstance(getattr(self, key), bool):
                raise _bench_error(f"{key} = {getattr(self, key)!r} is not valid; expected true or false")
        if not isinstance(self.crossover_method, str):
            raise _bench_error(f"crossover_method = {self.crossover_method!r} is not valid; expected a "
                               "method name")
        experts = self.crossover_experts
        if (not isinstance(experts, (list, tuple)) or not experts
                or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 2 for e in experts)):
            raise _bench_error(f"crossover_experts = {experts!r} is not valid; expected a non-empty "
                               "list of integers >= 2 (expert counts of rank-1 experts)")
        if config is None or not self.crossover:
            return
        from harness.methods import get_method
        from harness.methods.mixture import BlockMixtureMethod
        from harness.study import load_methods

        options = {m.name: opts for m, opts in load_methods(config)}  # loads the config's plugins
        try:
            method = get_method(self.crossover_method)
        except Exception as exc:  # the registry's message lists the registered methods
            raise _bench_error(f"crossover_method = {self.crossover_method!r}: {exc}") from None
        K = config["budget"]["active_rank"]
        if not (
            isinstance(method, BlockMixtureMethod)
            and method.routed
            and method.sweeps_granularity
            and method.uses_top_k(options.get(method.name, {}))
        ):
            raise _bench_error(
                f"crossover_method = {self.crossover_method!r} has no top-k block-gated router with a "
                "granularity sweep, so it has no sparse path to compare; use sira, smora or malora "
                "(or molora with options {sparse: true})")
        if not any(e > K for e in experts):
            raise _bench_error(
                f"crossover_experts = {list(experts)}: every count is <= the active rank K = {K} "
                f"(top-k is K in the sweep, so E must exceed it); give counts above {K}")


def _bench_error(message: str) -> Exception:
    from harness.config import ConfigError

    return ConfigError(f"bench.{message}")


# -- small helpers ------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, n: int, fn: Callable[[], Any]) -> list[float]:
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


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on every platform
        return None


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (Linux reports KiB, macOS bytes)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _share_frozen(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` that shares (does not copy) its parameters and buffers."""
    memo = {id(p): p for p in module.parameters()}
    memo.update({id(b): b for b in module.buffers()})
    return copy.deepcopy(module, memo)


class SavedTensorMeter:
    """Bytes of distinct tensor storages autograd saves for backward (frozen weights excluded)."""

    def __init__(self, exclude: Sequence[torch.Tensor]):
        self.exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self.seen: set[int] = set()
        self.bytes = 0

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.exclude and ptr not in self.seen:
            self.seen.add(ptr)
            self.bytes += storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


# -- the shared context: model, batches, device ---------------------------------------------


@dataclass
class BenchContext:
    config: dict[str, Any]
    options: BenchOptions
    model: nn.Module
    tokenizer: Any
    device: torch.device
    autocast_factory: Callable[[], Any]
    layer_ids: list[int]
    targets: list
    start: int | None
    train_cached: tuple  # batch tensors for the cached upper-layer step
    train_full: tuple  # batch tensors for the full-depth step
    train_tasks: list[str]  # each training row's task (methods with needs_task_labels)
    real_tokens: int
    eval_cached: tuple  # (inputs, mask, rows, cols) for the scoring forward from the cache
    eval_full: tuple  # the same at full depth
    eval_sequences: int
    original_layers: dict[int, nn.Module]
    frozen_tensors: list[torch.Tensor]
    seed: int
    notes: list[str] = field(default_factory=list)

    def autocast(self):
        return self.autocast_factory()


def _bench_items(config: dict[str, Any]) -> tuple[list[dict], list[dict], str]:
    """Training and test items: the study's data if written, else generated (or the JSONL files)."""
    from harness.data.jsonl import load_jsonl

    data = config["data"]
    data_dir = Path(config["out_dir"]) / "data"
    if data["source"] == "generated":
        from harness.data.suite import generate_suite

        suite = generate_suite(
            data.get("seed", 1234), data.get("tasks"), data["train_per_task"], data["test_per_task"]
        )
        train, test, where = suite["train"], suite["test"], "generated suite"
    else:
        train, test = load_jsonl(data["train"]), load_jsonl(data["test"])
        where = f"{data['train']} / {data['test']}"
    if (data_dir / "train.jsonl").exists():
        train, where = load_jsonl(data_dir / "train.jsonl"), f"{data_dir / 'train.jsonl'}"
    return train, test, where


def _pad_to(batch: tuple, length: int | None, pad_id: int) -> tuple:
    """Right-pad the batch's inputs and mask to ``length`` positions (``bench.seq_len``)."""
    inputs, mask, rows, cols, targets = batch
    if length is None or inputs.shape[1] >= length:
        return batch
    extra = length - inputs.shape[1]
    if inputs.dim() == 3:
        inputs = torch.cat([inputs, inputs.new_zeros(inputs.shape[0], extra, inputs.shape[2])], 1)
    else:
        inputs = torch.cat([inputs, inputs.new_full((inputs.shape[0], extra), pad_id)], 1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)
    return inputs, mask, rows, cols, targets


def build_context(config: dict[str, Any], options: BenchOptions) -> BenchContext:
    from harness.modeling import (
        adapted_layer_indices,
        cache_root,
        decoder_layers,
        load_base_model,
        resolve_model,
        target_shapes,
    )
    from harness.split import LowerCache
    from harness.train import Batcher, batch_schedule, build_examples, select_device, step_autocast

    model_cfg, train_cfg = config["model"], config["train"]
    torch.set_num_threads(options.threads)
    seed = train_cfg["seeds"][0]
    source = resolve_model(model_cfg, cache_root(config))
    dtype = getattr(torch, model_cfg["dtype"])
    device = select_device(model_cfg["device"])
    model, tokenizer = load_base_model(source, dtype)
    model.to(device)
    layer_ids = adapted_layer_indices(model, model_cfg["adapt_layers"])
    targets = target_shapes(model, model_cfg["target_modules"], layer_ids)
    start = min(layer_ids) if model_cfg["lower_layer_cache"] and min(layer_ids) > 0 else None

    train_items, test_items, where = _bench_items(config)
    max_length = options.seq_len or train_cfg["max_length"]
    examples, _ = build_examples(tokenizer, train_items, max_length)
    batch_size = options.batch_size or train_cfg["batch_size"]
    if batch_size > len(examples):
        from harness.config import ConfigError

        where = "bench.batch_size" if options.batch_size else "train.batch_size"
        raise ConfigError(f"{where} = {batch_size} exceeds the {len(examples)} training examples; lower it")
    indices = batch_schedule(len(examples), batch_size, seed, 0)
    batch_examples = [examples[i] for i in indices]
    local = list(range(len(batch_examples)))
    pad_id = tokenizer.pad_token_id
    full = _pad_to(Batcher(batch_examples, None, pad_id, device)(local), options.seq_len, pad_id)
    if start is not None:
        lower = LowerCache.build(
            model, [e.ids for e in batch_examples], start, pad_id,
            batch_size=len(batch_examples), desc="lower layers (bench)",
        )
        cached = _pad_to(Batcher(batch_examples, lower, pad_id, device)(local), options.seq_len, pad_id)
    else:
        cached = full
    real_tokens = int(full[1].sum())

    # evaluation: eval.batch_size distinct test prompts, scored where lm-eval scores them
    test_examples, _ = build_examples(tokenizer, test_items, max_length)
    seqs = sorted({tuple(e.ids[:-1]): e for e in test_examples}.items(), key=lambda kv: (len(kv[0]), kv[0]))
    n_eval = min(config["eval"]["batch_size"], len(seqs))
    step = len(seqs) / n_eval
    chosen = [seqs[int(i * step)] for i in range(n_eval)]
    rows = torch.tensor([r for r, (_, e) in enumerate(chosen) for _ in e.positions], device=device)
    cols = torch.tensor([p for _, e in chosen for p in e.positions], device=device)
    eval_ids, eval_mask = _pad_ids([list(s) for s, _ in chosen], pad_id)
    eval_full = (eval_ids.to(device), eval_mask.to(device), rows, cols)
    if start is not None:
        lower_eval = LowerCache.build(
            model, [list(s) for s, _ in chosen], start, pad_id, batch_size=n_eval, desc="lower layers (bench eval)"
        )
        hidden, mask = lower_eval.batch(list(range(n_eval)))
        eval_cached = (hidden.to(device), mask.to(device), rows, cols)
    else:
        eval_cached = eval_full

    layers = decoder_layers(model)
    frozen = [p for p in model.parameters()] + [b for b in model.buffers()]
    ctx = BenchContext(
        config=config,
        options=options,
        model=model,
        tokenizer=tokenizer,
        device=device,
        autocast_factory=lambda: step_autocast(device, model_cfg["dtype"]),
        layer_ids=layer_ids,
        targets=targets,
        start=start,
        train_cached=cached,
        train_full=full,
        train_tasks=[e.task for e in batch_examples],
        real_tokens=real_tokens,
        eval_cached=eval_cached,
        eval_full=eval_full,
        eval_sequences=n_eval,
        original_layers={i: layers[i] for i in layer_ids},
        frozen_tensors=frozen,
        seed=seed,
    )
    ctx.notes.append(
        f"data: {where}; training batch {batch_size} x {cached[1].shape[1]} positions "
        f"({real_tokens} real tokens); evaluation batch {n_eval} sequences x {eval_ids.shape[1]} positions"
    )
    return ctx


def _pad_ids(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    from harness.split import pad_batch

    return pad_batch(seqs, pad_id)


# -- contenders ----------------------------------------------------------------------------


@dataclass
class Contender:
    key: str
    method: str
    variant: str
    granularity: int
    method_config: Any
    layers: dict[int, nn.Module]
    handle: Any
    optimizer: Any
    scheduler: Any
    full_depth: bool = False
    info: dict[str, Any] = field(default_factory=dict)
    step_times: list[list[float]] = field(default_factory=list)  # per repeat
    eval_times: list[list[float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    saved_act_bytes: int | None = None
    cuda_peak_bytes: int | None = None


def _note(ctx: BenchContext, text: str) -> None:
    if text not in ctx.notes:
        ctx.notes.append(text)


def install(ctx: BenchContext, layers: dict[int, nn.Module]) -> None:
    from harness.modeling import decoder_layers

    blocks = decoder_layers(ctx.model)
    for i, layer in layers.items():
        blocks[i] = layer


def make_contender(
    ctx: BenchContext,
    key: str,
    method_name: str,
    method_config,
    variant: str = "",
    granularity: int = 1,
    full_depth: bool = False,
) -> Contender:
    """Copies of the adapted layers (frozen weights shared), the method applied to them,
    AdamW and the scheduler as :func:`harness.train.train_run` builds them."""
    from transformers import get_scheduler

    from harness.methods import get_method
    from harness.methods.inject import apply_method

    train_cfg = ctx.config["train"]
    method = get_method(method_name)
    layers = {i: _share_frozen(layer) for i, layer in ctx.original_layers.items()}
    install(ctx, layers)
    torch.manual_seed(ctx.seed)
    handle = apply_method(ctx.model, method, method_config, ctx.targets)
    components = method.components(ctx.config, method_config, ctx.seed)
    stage = None
    if components:  # a later training stage (MoA's router): load and freeze the earlier stages
        paths = [Path(ctx.config["out_dir"]) / c.path for c in components]
        missing = [p for p in paths if not (p / "train.json").exists()]
        if missing:
            stage = "earlier stages not trained yet: their parameters train too"
            _note(ctx, f"{key}: {len(missing)} of {len(paths)} components ({missing[0]}, ...) are not "
                       "trained yet, so the step trains them too instead of loading them frozen "
                       "(an upper bound on the real step); run the study's earlier stage first")
        else:
            method.load_components(handle, paths)
            stage = "earlier stages loaded and frozen"
    if hasattr(ctx.model, "peft_config"):  # peft leaves its config on the model; each copy is separate
        del ctx.model.peft_config
    ctx.model.to(ctx.device)
    optimizer = torch.optim.AdamW(
        handle.trainable_parameters(), lr=train_cfg["lr"], weight_decay=train_cfg["weight_decay"]
    )
    scheduler = get_scheduler(
        {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[train_cfg["schedule"]],
        optimizer,
        num_warmup_steps=0,
        num_training_steps=1_000_000,
    )
    info = {"trainable_params": handle.trainable_numel(), **method.describe(method_config)}
    if stage:
        info["stage"] = stage
    path = getattr(method_config, "path", None)
    if path is not None:
        from harness.methods.core import choose_path

        info["path"] = choose_path(path, method_config.num_experts, method_config.top_k)
    install(ctx, ctx.original_layers)
    return Contender(
        key, method_name, variant, granularity, method_config, layers, handle, optimizer, scheduler,
        full_depth, info,
    )


def train_step(ctx: BenchContext, c: Contender, meter: SavedTensorMeter | None = None) -> float:
    """One optimizer step, :func:`harness.train.optimizer_step` as the training loop calls it."""
    from contextlib import nullcontext

    from harness.train import optimizer_step

    batch = ctx.train_full if c.full_depth else ctx.train_cached
    start = None if c.full_depth else ctx.start
    labels = ctx.train_tasks if c.handle.method.needs_task_labels else None
    with meter.hooks() if meter is not None else nullcontext():
        loss, _, _ = optimizer_step(
            ctx.model, c.handle, c.optimizer, c.scheduler, batch, start, ctx.autocast(), labels,
            ctx.config["train"]["max_grad_norm"],
            lambda value: RuntimeError(f"bench: {c.key}: the loss became {value}"),
        )
    value = float(loss.detach())
    c.losses.append(value)
    return value


@torch.no_grad()
def eval_batch(ctx: BenchContext, c: Contender) -> torch.Tensor:
    """The scoring forward of :class:`harness.lm_model.HarnessLM` on the evaluation batch
    (real tokens marked for the routers, as there)."""
    from harness.lm_model import score_logprobs

    inputs, mask, rows, cols = ctx.eval_full if c.full_depth else ctx.eval_cached
    start = None if c.full_depth else ctx.start
    with c.handle.token_mask(mask):
        return score_logprobs(ctx.model, inputs, mask, start, rows, cols)


def state_bytes(c: Contender) -> int:
    """Adapter parameters + their gradients + the optimizer's state tensors."""
    params = [p for group in c.optimizer.param_groups for p in group["params"]]
    n = sum(p.numel() * p.element_size() for p in params) * 2  # values and gradients
    for state in c.optimizer.state.values():
        n += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return n


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
            times = _timed(device, timed, lambda c=c: train_step(ctx, c))
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device)
                c.cuda_peak_bytes = max(c.cuda_peak_bytes or 0, peak)
            c.step_times.append(times)
            if eval_batches:
                model.eval()
                c.eval_times.append(_timed(device, eval_batches, lambda c=c: eval_batch(ctx, c)))
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


# -- the main table -----------------------------------------------------------------------


def plan_contenders(ctx: BenchContext) -> list[tuple[str, str, str, int, Any]]:
    """``(key, method, variant, G, config)`` per (method, variant) of the plan (first seed),
    plus peft LoRA at ranks R and K when the config does not list LoRA."""
    from harness.budget import BudgetRequest
    from harness.methods import get_method
    from harness.methods.base import Variant
    from harness.study import plan_study

    plan = plan_study(ctx.config)
    out = []
    seen = set()
    for run in plan.runs:
        if run.is_base or run.seed != ctx.seed:
            continue
        key = f"{run.method}-{run.tag}"
        if key in seen:
            continue
        seen.add(key)
        method = get_method(run.method)
        out.append((key, run.method, run.tag, run.granularity, method.make_config(**run.method_config)))
    request = BudgetRequest.from_config(ctx.config["budget"])
    lora = get_method("lora")
    for rank in (request.total_rank, request.active_rank):
        key = f"lora-r{rank}"
        if key not in seen:
            seen.add(key)
            cfg = lora.solve(request, Variant(1, f"r{rank}", rank), plan.shapes)
            out.append((key, "lora", f"r{rank}", 1, cfg))
    return out


def bench_main(ctx: BenchContext, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """The per-method table and the cached-vs-full-depth comparison for LoRA rank R."""
    o = ctx.options
    R = ctx.config["budget"]["total_rank"]
    specs = plan_contenders(ctx)
    contenders = [make_contender(ctx, key, m, cfg, tag, g) for key, m, tag, g, cfg in specs]
    ref = next(c for c in contenders if c.key == f"lora-r{R}")
    full = None
    if ctx.start is not None:
        full = make_contender(ctx, f"lora-r{R}-full-depth", "lora", ref.method_config, f"r{R}", 1, True)
        contenders.append(full)
    log(f"main table: {len(contenders)} contenders, {o.warmup_steps} warm-up + "
        f"{o.repeats} x {o.timed_steps} timed steps each, round robin")
    time_round_robin(ctx, contenders, o.warmup_steps, o.timed_steps, o.repeats, o.eval_batches, log)

    ref_s = summarise(ref)
    rows = []
    for c in contenders:
        if c is full:
            continue
        s = summarise(c)
        lo, hi = ratio_range(c, ref)
        rows.append(
            {
                "method": c.method,
                "variant": c.variant,
                "G": c.granularity,
                "experts": c.info.get("num_experts"),
                "expert_rank": c.info.get("expert_rank"),
                "top_k": c.info.get("top_k"),
                "path": c.info.get("path", "peft"),
                "trainable_params": c.info["trainable_params"],
                "step_ms_median": s["step_ms_median"],
                "step_ms_iqr": s["step_ms_iqr"],
                "ratio_vs_lora_R": s["step_ms_median"] / ref_s["step_ms_median"],
                "ratio_min": lo,
                "ratio_max": hi,
                "tokens_per_s": ctx.real_tokens / (s["step_ms_median"] / 1000),
                "eval_ms_median": s["eval_ms_median"],
                "eval_seq_per_s": ctx.eval_sequences / (s["eval_ms_median"] / 1000),
                "eval_ratio_vs_lora_R": s["eval_ms_median"] / ref_s["eval_ms_median"],
                "state_mb": state_bytes(c) / 2**20,
                "saved_act_mb": (c.saved_act_bytes or 0) / 2**20,
                "cuda_peak_mb": None if c.cuda_peak_bytes is None else c.cuda_peak_bytes / 2**20,
            }
        )
    cache = {}
    if full is not None:
        fs = summarise(full)
        n = min(len(full.losses), len(ref.losses))
        diffs = [abs(a - b) for a, b in zip(full.losses[:n], ref.losses[:n])]
        cache = {
            "method": "lora",
            "variant": f"r{R}",
            "split_layer": ctx.start,
            "layers_total": len(ctx.model.model.layers),
            "full_depth_step_ms": fs["step_ms_median"],
            "full_depth_step_ms_iqr": fs["step_ms_iqr"],
            "cached_step_ms": ref_s["step_ms_median"],
            "cached_step_ms_iqr": ref_s["step_ms_iqr"],
            "speedup": fs["step_ms_median"] / ref_s["step_ms_median"],
            "full_depth_eval_ms": fs["eval_ms_median"],
            "cached_eval_ms": ref_s["eval_ms_median"],
            "eval_speedup": fs["eval_ms_median"] / ref_s["eval_ms_median"],
            "steps_compared": n,
            "max_abs_loss_diff": max(diffs) if diffs else float("nan"),
            "first_loss": ref.losses[0] if ref.losses else float("nan"),
            "last_loss": ref.losses[n - 1] if n else float("nan"),
        }
    _release(*contenders)
    return rows, cache


def _release(*contenders: Contender) -> None:
    """Drop the contenders' layers, adapters and optimizer state (one garbage collection)."""
    for c in contenders:
        c.layers.clear()
        c.handle = c.optimizer = c.scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- crossover: dense vs sparse ------------------------------------------------------------


def bench_crossover(ctx: BenchContext, log: Callable[[str], None]) -> list[dict]:
    """Dense vs sparse execution of one routed method at growing expert counts: rank-1
    experts, top-k = the study's active rank K (so the active rank stays K), total rank = E."""
    from harness.budget import BudgetRequest
    from harness.methods import get_method
    from harness.methods.base import Variant
    from harness.methods.core import choose_path
    from harness.study import load_methods

    o = ctx.options
    budget = ctx.config["budget"]
    K = budget["active_rank"]
    name = o.crossover_method
    options = dict(next((opts for m, opts in load_methods(ctx.config) if m.name == name), {}))
    options.pop("path", None)
    method = get_method(name)
    rows = []
    pairs = []
    for experts in o.crossover_experts:
        if experts <= K:
            continue
        request = BudgetRequest(experts, K, (experts,), "separate", budget["tolerance"], budget["alpha"])
        base = method.solve(request, Variant(experts, f"G{experts}"), ctx.targets, options)
        pair = []
        for path in ("dense", "sparse"):
            cfg = dataclasses.replace(base, path=path)
            pair.append(make_contender(ctx, f"{name}-E{experts}-{path}", name, cfg, f"G{experts}", experts))
        pairs.append((experts, base, pair))
    contenders = [c for _, _, pair in pairs for c in pair]
    log(f"crossover: {name}, {len(pairs)} expert counts x dense/sparse, "
        f"{o.sweep_repeats} x {o.sweep_steps} timed steps each")
    time_round_robin(ctx, contenders, 1, o.sweep_steps, o.sweep_repeats, 0, log)
    for experts, base, (dense, sparse) in pairs:
        sd, ss = summarise(dense), summarise(sparse)
        for c, s in ((dense, sd), (sparse, ss)):
            rows.append(
                {
                    "method": name,
                    "experts": experts,
                    "expert_rank": base.expert_rank,
                    "top_k": base.top_k,
                    "experts_per_top_k": experts / base.top_k,
                    "path": c.method_config.path,
                    "step_ms_median": s["step_ms_median"],
                    "step_ms_iqr": s["step_ms_iqr"],
                    "sparse_over_dense": ss["step_ms_median"] / sd["step_ms_median"],
                    "auto_picks": choose_path("auto", experts, base.top_k),
                }
            )
    _release(*contenders)
    return rows


def crossover_point(rows: list[dict]) -> float | None:
    """The smallest ``experts / top-k`` from which on the sparse path is faster at every
    measured point (``None``: dense wins somewhere at the largest counts)."""
    ratios = sorted({r["experts_per_top_k"]: r["sparse_over_dense"] for r in rows}.items())
    point = None
    for ratio, rel in reversed(ratios):
        if rel < 1.0:
            point = ratio
        else:
            break
    return point


# -- scaling sweeps ------------------------------------------------------------------------


def scaling_points(config: dict[str, Any]) -> list[tuple[str, int, int, int]]:
    """``(sweep, G, R, K)``: experts at fixed total rank R (every divisor G >= 2 of R, with
    top-k = max(1, K·G/R) rounded, so the active rank stays near K), and total rank at fixed
    experts (the study's middle granularity, R' = G·2^j, the study's top-k kept)."""
    budget = config["budget"]
    R, K = budget["total_rank"], budget["active_rank"]
    points = []
    for g in range(2, R + 1):
        if R % g:
            continue
        k = max(1, round(K * g / R))
        points.append(("experts", g, R, k * (R // g)))
    grans = sorted(budget["granularities"])
    g = grans[len(grans) // 2]
    k = max(1, K * g // R)
    for j in range(5):
        r_total = g * 2**j
        points.append(("total_rank", g, r_total, k * (r_total // g)))
    return points


def bench_scaling(ctx: BenchContext, log: Callable[[str], None]) -> list[dict]:
    from harness.budget import BudgetRequest
    from harness.methods import BudgetError
    from harness.methods.base import Variant
    from harness.study import load_methods

    o = ctx.options
    budget = ctx.config["budget"]
    methods = load_methods(ctx.config)
    # routed methods whose expert count is a free choice; MoA's is its number of tasks
    routed = [(m, opts) for m, opts in methods if m.routed and m.sweeps_granularity]
    fixed = [m.name for m, _ in methods if m.routed and not m.sweeps_granularity]
    if fixed:
        _note(ctx, f"scaling: {', '.join(fixed)} left out (the number of experts is fixed by the "
                   "method, e.g. MoA's one adapter per task)")
    specs = []
    for sweep, g, r_total, k_active in scaling_points(ctx.config):
        request = BudgetRequest(r_total, k_active, (g,), budget.get("router", "separate"),
                                budget.get("tolerance", 0.05), budget["alpha"])
        for method, opts in routed:
            try:
                cfg = method.solve(request, Variant(g, f"G{g}"), ctx.targets, opts)
            except BudgetError as exc:
                ctx.notes.append(f"scaling: {method.name} G={g} R={r_total} skipped: {str(exc)[:120]}")
                continue
            specs.append((sweep, g, r_total, k_active, method.name, cfg))
    ref_ranks = sorted({r for s, _, r, _ in scaling_points(ctx.config)})
    from harness.methods import get_method

    lora = get_method("lora")
    for r_total in ref_ranks:
        specs.append(("lora", 1, r_total, r_total, "lora", lora.make_config(alpha=budget["alpha"], rank=r_total)))
    contenders = {}
    sweeps: dict[str, list[tuple[str, int]]] = {}
    for sweep, g, r_total, k_active, name, cfg in specs:
        key = f"{name}-G{g}-R{r_total}"
        sweeps.setdefault(key, []).append((sweep, k_active))
        if key not in contenders:
            contenders[key] = make_contender(ctx, key, name, cfg, f"G{g}", g)
    repeats = o.sweep_repeats
    log(f"scaling: {len(contenders)} contenders, {repeats} x {o.sweep_steps} timed steps each")
    time_round_robin(ctx, list(contenders.values()), 1, o.sweep_steps, repeats, 0, log)
    rows = []
    for key, c in contenders.items():
        s = summarise(c)
        r_total = int(key.rpartition("-R")[2])
        for sweep, k_active in sweeps[key]:
            rows.append({
                "sweep": sweep,
                "method": c.method,
                "experts": c.info.get("num_experts"),
                "expert_rank": c.info.get("expert_rank"),
                "top_k": c.info.get("top_k"),
                "total_rank": r_total,
                "active_rank": k_active,
                "path": c.info.get("path", "peft"),
                "trainable_params": c.info["trainable_params"],
                "step_ms_median": s["step_ms_median"],
                "step_ms_iqr": s["step_ms_iqr"],
            })
    _release(*contenders.values())
    return rows


def plot_scaling(rows: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"molora": "o", "sira": "s", "smora": "^", "malora": "D", "multilora": "v"}
    styles = ["-", "--", "-.", ":", (0, (5, 1, 1, 1))]
    methods = sorted({r["method"] for r in rows if r["sweep"] != "lora"})
    lora = sorted((r for r in rows if r["sweep"] == "lora"), key=lambda r: r["total_rank"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, sweep, xkey, xlabel in (
        (axes[0], "experts", "experts", "number of experts E (total rank fixed)"),
        (axes[1], "total_rank", "total_rank", "total rank R (number of experts fixed)"),
    ):
        sub = [r for r in rows if r["sweep"] == sweep]
        for i, m in enumerate(methods):
            pts = sorted((r for r in sub if r["method"] == m), key=lambda r: r[xkey])
            if not pts:
                continue
            ax.plot(
                [p[xkey] for p in pts], [p["step_ms_median"] for p in pts],
                marker=markers.get(m, "x"), linestyle=styles[i % len(styles)], color="0.15",
                markerfacecolor="white", label=m,
            )
        if sweep == "experts" and sub:
            r_fixed = sub[0]["total_rank"]
            ref = [r for r in lora if r["total_rank"] == r_fixed]
            if ref:
                ax.axhline(ref[0]["step_ms_median"], color="0.5", linestyle=":",
                           label=f"peft LoRA r={r_fixed}")
            ax.set_title(f"total rank R = {r_fixed}")
        if sweep == "total_rank" and sub:
            ranks = sorted({r["total_rank"] for r in sub})
            ref = [r for r in lora if r["total_rank"] in ranks]
            ax.plot([r["total_rank"] for r in ref], [r["step_ms_median"] for r in ref],
                    marker="x", color="0.5", linestyle=":", label="peft LoRA r=R")
            ax.set_title(f"experts E = {sub[0]['experts']}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r[xkey] for r in sub if r[xkey] is not None})
        if ticks:  # the measured values, not powers of two
            ax.set_xticks(ticks, [str(t) for t in ticks])
            ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training step time (ms, median)")
        ax.grid(True, color="0.85", linewidth=0.6)
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [out / "scaling.png", out / "scaling.pdf"]
    for p in paths:
        fig.savefig(p, dpi=150)
    plt.close(fig)
    return paths


# -- evaluation lower-layer cache: before / after -------------------------------------------


def bench_eval_cache(ctx: BenchContext, log: Callable[[str], None], work: Path) -> dict | None:
    """One real evaluation (:func:`harness.evaluate.evaluate_run`, lm-eval on the study's
    task folder) of an (untrained) LoRA rank R adapter, three ways: with the shared
    evaluation cache when it does not exist yet (the first run of a study builds it),
    when it exists (every later run), and without it (``model.lower_layer_cache: false``:
    full depth every run), after one untimed warm-up evaluation. Threads: the study's
    ``train.threads``, as its jobs use."""
    import shutil

    from harness.evaluate import evaluate_run
    from harness.modeling import cache_root
    from harness.run_model import write_run_spec
    from harness.study import plan_study

    config = ctx.config
    if ctx.start is None:
        _note(ctx, "eval cache comparison skipped: no lower-layer split (model.lower_layer_cache is "
                   "false or the lowest layer is adapted)")
        return None
    if config["data"]["source"] == "lm_eval":
        _note(ctx, "eval cache comparison skipped: data.source lm_eval scores registry tasks")
        return None
    R = config["budget"]["total_rank"]
    plan = plan_study(config)
    run = next((r for r in plan.trained_runs if r.method == "lora" and r.tag == f"r{R}"), None)
    if run is None:
        _note(ctx, "eval cache comparison skipped: the config has no LoRA rank R run (add lora to methods)")
        return None
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"
    (cache / "models").mkdir(parents=True)
    out_dir = config["out_dir"]
    if not (Path(out_dir) / "data" / "data_summary.json").exists():
        # no study data folder yet: write the same data (deterministic) into the work folder
        from harness.data.prepare import prepare_data

        out_dir = str(work)
        prepare_data(config["data"], work / "data")
        _note(ctx, "eval cache: the study's data folder does not exist yet; its data were written "
                   "to a temporary folder for the comparison")
    real_models = (cache_root(config) / "models").resolve()
    for p in real_models.iterdir():
        if p.is_dir():
            (cache / "models" / p.name).symlink_to(p)
    # an adapter to load: LoRA rank R as initialised (the cost does not depend on the weights)
    from harness.methods import get_method

    lora_cfg = get_method("lora").make_config(**run.method_config)
    c = make_contender(ctx, "eval-cache", "lora", lora_cfg)
    install(ctx, c.layers)
    run_dir = work / "run"
    # an untimed first evaluation takes the one-time costs of the process (lm-eval's task
    # building, first reads of the weights) off whichever variant would come first
    variants = {
        "warmup": (True, "untimed: one-time costs of the process; its cache is deleted"),
        "cache_build": (True, "first run of a study: builds the shared cache, then scores"),
        "cache_reuse": (True, "every later run: the shared cache exists"),
        "no_cache": (False, "model.lower_layer_cache: false: full depth every run"),
    }
    threads_before = torch.get_num_threads()
    env_cache = os.environ.pop("HARNESS_CACHE", None)  # it would override the private cache_dir
    out: dict[str, Any] = {"threads": config["train"]["threads"], "runs_in_study": len(plan.runs)}
    try:
        for name, (enabled, _) in variants.items():
            if name == "cache_build":
                shutil.rmtree(cache / "lower", ignore_errors=True)
            cfg = copy.deepcopy(config)
            cfg["cache_dir"] = str(cache)
            cfg["out_dir"] = out_dir
            cfg["model"]["lower_layer_cache"] = enabled
            shutil.rmtree(run_dir, ignore_errors=True)
            write_run_spec(cfg, run, run_dir)
            c.handle.save(run_dir / "adapter", extra={"run_id": run.run_id})
            log(f"eval cache: {name} ...")
            t0 = time.perf_counter()
            metrics = evaluate_run(cfg, run, run_dir, progress=False)
            if name != "warmup":
                out[f"{name}_s"] = time.perf_counter() - t0
                out[f"{name}_acc"] = metrics["suite_acc"]
    finally:
        if env_cache is not None:
            os.environ["HARNESS_CACHE"] = env_cache
        torch.set_num_threads(threads_before)
        install(ctx, ctx.original_layers)
        _release(c)
        shutil.rmtree(work, ignore_errors=True)
    n = out["runs_in_study"]
    out["study_eval_before_s"] = n * out["no_cache_s"]
    out["study_eval_after_s"] = out["cache_build_s"] + (n - 1) * out["cache_reuse_s"]
    out["study_eval_saved_s"] = out["study_eval_before_s"] - out["study_eval_after_s"]
    out["same_scores"] = out["cache_reuse_acc"] == out["no_cache_acc"] == out["cache_build_acc"]
    return out


# -- writing -------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_markdown(rows: list[dict], R: int) -> str:
    headers = [
        "method", "variant", "experts x rank (top-k)", "path", "step ms (median ± IQR)",
        f"× LoRA r{R} (range)", "tokens/s", "eval seq/s", f"eval × LoRA r{R}",
        "state MB", "saved act. MB",
    ]
    if any(r["cuda_peak_mb"] is not None for r in rows):
        headers.append("CUDA peak MB")
    body = []
    for r in rows:
        shape = f"{r['experts']} x {r['expert_rank']} ({r['top_k']})"
        line = [
            r["method"], r["variant"], shape, r["path"],
            f"{r['step_ms_median']:.1f} ± {r['step_ms_iqr']:.1f}",
            f"{r['ratio_vs_lora_R']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})",
            f"{r['tokens_per_s']:.0f}", f"{r['eval_seq_per_s']:.0f}", f"{r['eval_ratio_vs_lora_R']:.2f}",
            f"{r['state_mb']:.1f}", f"{r['saved_act_mb']:.1f}",
        ]
        if len(headers) > len(line):
            line.append(_fmt(r["cuda_peak_mb"], 0))
        body.append(line)
    return markdown_table(headers, body)


def _device_words(ctx: BenchContext) -> str:
    import platform

    if ctx.device.type == "cuda":
        return f"{torch.cuda.get_device_name(ctx.device)}, dtype {ctx.config['model']['dtype']}"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, " \
           f"dtype {ctx.config['model']['dtype']}"


def write_report(
    ctx: BenchContext,
    out: Path,
    main_rows: list[dict],
    cache: dict,
    crossover_rows: list[dict],
    scaling_rows: list[dict],
    eval_cache: dict | None,
    wall_s: float,
) -> str:
    from harness.methods.core import SPARSE_CROSSOVER_RATIO

    R = ctx.config["budget"]["total_rank"]
    o = ctx.options
    parts = [
        f"# Benchmark: {ctx.config['study']}",
        "",
        f"Device: {_device_words(ctx)}. Model: {ctx.config['model']['source']}, "
        f"layers {ctx.layer_ids[0]}–{ctx.layer_ids[-1]} adapted "
        f"({len(ctx.targets)} linear layers), budget R = {R}, K = {ctx.config['budget']['active_rank']}.",
        "",
        f"{o.warmup_steps} warm-up steps, then {o.repeats} round-robin repeats of {o.timed_steps} timed "
        f"training steps and {o.eval_batches} evaluation batches per contender. "
        "Ratios are to peft LoRA rank R measured in the same process; "
        "the range is the ratio's min–max over the repeats.",
        "",
        *[f"- {n}" for n in ctx.notes],
        "",
        "## Training step and evaluation, per method",
        "",
        main_markdown(main_rows, R),
        "",
    ]
    if cache:
        parts += [
            "## Frozen lower-layer cache (LoRA rank R)",
            "",
            markdown_table(
                ["", "full depth", f"from cache (layers {cache['split_layer']}+ of {cache['layers_total']})",
                 "speed-up"],
                [
                    ["training step, ms", f"{cache['full_depth_step_ms']:.1f}", f"{cache['cached_step_ms']:.1f}",
                     f"{cache['speedup']:.2f}x"],
                    ["evaluation batch, ms", f"{cache['full_depth_eval_ms']:.1f}", f"{cache['cached_eval_ms']:.1f}",
                     f"{cache['eval_speedup']:.2f}x"],
                ],
            ),
            "",
            f"Same initial weights and batches: the largest |loss difference| over "
            f"{cache['steps_compared']} steps is {cache['max_abs_loss_diff']:.3g}.",
            "",
        ]
    if crossover_rows:
        point = crossover_point(crossover_rows)
        body = []
        for r in crossover_rows:
            if r["path"] != "dense":
                continue
            sp = next(x for x in crossover_rows if x["experts"] == r["experts"] and x["path"] == "sparse")
            body.append([
                str(r["experts"]), str(r["top_k"]), f"{r['experts_per_top_k']:g}",
                f"{r['step_ms_median']:.1f}", f"{sp['step_ms_median']:.1f}", f"{r['sparse_over_dense']:.2f}",
                r["auto_picks"],
            ])
        parts += [
            f"## Dense vs sparse execution ({crossover_rows[0]['method']}, rank-1 experts)",
            "",
            markdown_table(
                ["experts", "top-k", "experts / top-k", "dense ms", "sparse ms", "sparse / dense",
                 "auto picks"], body),
            "",
            "Sparse is faster from experts / top-k = "
            + (f"{point:g}" if point is not None else "(never, in the measured range)")
            + f" on. `path: auto` picks sparse from experts / top-k = {SPARSE_CROSSOVER_RATIO:g} "
            "(`harness.methods.core.SPARSE_CROSSOVER_RATIO`, set from this benchmark on the "
            "default CPU setup); a method's `path` option (`dense`, `sparse`) overrides it.",
            "",
        ]
    if scaling_rows:
        parts += ["## Scaling", "", "See `scaling.png` / `scaling.csv`.", ""]
    if eval_cache:
        e = eval_cache
        parts += [
            "## Evaluation lower-layer cache, one real lm-eval evaluation "
            f"({e['threads']} thread(s), as the study's jobs)",
            "",
            markdown_table(
                ["", "seconds", "suite acc"],
                [
                    ["with cache, first run (builds it)", f"{e['cache_build_s']:.1f}", _fmt(e["cache_build_acc"], 4)],
                    ["with cache, later runs", f"{e['cache_reuse_s']:.1f}", _fmt(e["cache_reuse_acc"], 4)],
                    ["without cache (full depth)", f"{e['no_cache_s']:.1f}", _fmt(e["no_cache_acc"], 4)],
                ],
            ),
            "",
            "Each after one untimed warm-up evaluation in the same process; the cache is private "
            "to the benchmark (built from scratch for the first row). "
            f"Study with {e['runs_in_study']} evaluations (computed: runs x seconds): "
            f"{e['study_eval_before_s'] / 60:.1f} min without the cache, "
            f"{e['study_eval_after_s'] / 60:.1f} min with it "
            f"(saves {e['study_eval_saved_s'] / 60:.1f} min).",
            "",
        ]
    parts += [
        f"Process peak resident memory (ru_maxrss): {peak_rss_mb():.0f} MiB. Benchmark wall time: "
        f"{wall_s:.0f} s.",
        "",
    ]
    text = "\n".join(parts)
    (out / "bench.md").write_text(text)
    return text


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
        load_before = _load_average()
        ctx = build_context(config, options)
        log(f"bench: {_device_words(ctx)}; {ctx.notes[0]}")
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
            _note(ctx, f"machine: {os.cpu_count()} CPUs; 1-minute load average {load_before:.2f} at the "
                       f"start, {_load_average():.2f} at the end (this process adds up to {options.threads})")
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
