"""Training one run: the same loop, optimizer, schedule, batches and prompts for every method.

The loop knows methods only through :class:`~harness.adapters.inject.AdapterHandle`:
the task loss (cross-entropy on the answer token(s), logits computed only there)
plus ``handle.aux_loss()``, then ``handle.after_optimizer_step()`` once per
step. Batches come in a fixed order derived from the seed alone, so every
method sees the same data in the same order (paired comparisons across methods).

Resumable: every ``checkpoint_every`` steps the adapter, optimizer, scheduler and
RNG states are written atomically; a killed run continues from there and ends
with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import random
import resource
import shutil
import statistics
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_scheduler

from harness.adapters import AdapterHandle, get_method
from harness.common.files import atomic_write_json
from harness.common.provenance import provenance
from harness.data.jsonl import DataError, load_jsonl
from harness.data.prompts import training_texts
from harness.model.base import BaseModel, attach_method, autocast_context, load_base
from harness.model.load import cache_root
from harness.model.lower_cache import (
    cached_lower,
    full_forward,
    logits_at,
    pad_batch,
    upper_forward,
)
from harness.model.tokens import encode_pair
from harness.plan.memory import memory_table
from harness.plan.study import RunSettings, resolve_settings, tuned_rate

LOG_LOAD_EVERY = 10


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message has the step, the run folder and the
    last finite loss."""


@dataclass
class Example:
    ids: list[int]
    positions: list[int]  # where the answer token(s) are predicted
    targets: list[int]
    task: str


def build_examples(
    tokenizer, items: list[dict[str, Any]], max_length: int | str
) -> tuple[list[Example], int]:
    """Tokenised training examples (prompt + answer), and how many were left-truncated
    (``max_length: auto``: none, every example is as long as it is)."""

    examples, truncated = [], 0
    for item in items:
        context, answer = encode_pair(tokenizer, *training_texts(item))
        ids = context + answer
        if max_length == "auto":
            examples.append(
                Example(ids, [len(context) - 1 + j for j in range(len(answer))], answer, item.get("task", "all"))
            )
            continue
        if len(ids) > max_length:
            cut = len(ids) - max_length
            if cut >= len(context):
                raise ValueError(
                    f"train.max_length = {max_length} leaves no room for the prompt of an item of "
                    f"task {item.get('task')!r} ({len(context)} prompt + {len(answer)} answer tokens)"
                )
            ids, context = ids[cut:], context[cut:]
            truncated += 1
        start = len(context) - 1
        examples.append(
            Example(ids, [start + j for j in range(len(answer))], answer, item.get("task", "all"))
        )
    return examples, truncated


def batch_schedule(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The example indices of optimizer step ``step``: a fresh permutation per epoch, from the
    seed and the epoch alone (drop-last, so every batch has the same size)."""
    per_epoch = n_examples // batch_size
    if per_epoch == 0:
        raise ValueError(f"train.batch_size = {batch_size} exceeds the {n_examples} training examples")
    epoch, index = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[index * batch_size : (index + 1) * batch_size].tolist()


def select_examples(examples: list[Example], tasks: list[str] | None) -> list[int]:
    """Indices of the examples a run trains on: every example (``tasks`` None) or only
    those of ``tasks`` (MoA's per-task adapters, its router on a subset of tasks)."""
    if tasks is None:
        return list(range(len(examples)))
    wanted = set(tasks)
    pool = [i for i, e in enumerate(examples) if e.task in wanted]
    found = {examples[i].task for i in pool}
    missing = [t for t in tasks if t not in found]
    if missing:
        raise ValueError(
            f"no training items of task(s) {missing}; tasks in the training data: "
            f"{sorted({e.task for e in examples})}"
        )
    return pool


def prompt_mask(mask: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Real tokens up to each row's first predicted position: the prompt, not the trained
    answer tokens after it (routers that pool over a sequence read only this)."""
    first = torch.full((mask.shape[0],), mask.shape[1], dtype=torch.long, device=mask.device)
    first = first.scatter_reduce(0, rows, cols, reduce="amin")
    positions = torch.arange(mask.shape[1], device=mask.device)
    return mask.bool() & (positions.unsqueeze(0) <= first.unsqueeze(1))


SCHEDULES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def make_optimizer(handle: AdapterHandle, train_cfg: dict[str, Any], lr: float):
    """AdamW over the run's trainable adapter parameters (the same for every method)."""
    return torch.optim.AdamW(
        handle.trainable_parameters(), lr=lr, weight_decay=train_cfg["weight_decay"], fused=True
    )


def make_scheduler(optimizer, train_cfg: dict[str, Any], n_steps: int, n_warmup: int):
    """``train.schedule`` (transformers' schedulers): warm-up, then cosine, linear or constant."""

    return get_scheduler(
        SCHEDULES[train_cfg["schedule"]],
        optimizer,
        num_warmup_steps=n_warmup,
        num_training_steps=n_steps,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- checkpoints ---------------------------------------------------------------------------


def _save_checkpoint(
    directory: Path, handle: AdapterHandle, optimizer, scheduler, step: int, log_path: Path
) -> None:
    """Everything needed to continue bit-for-bit: adapter, optimizer, scheduler, RNGs and
    the training log so far (a rerun may delete the declared log output of a killed job)."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copyfile(log_path, tmp / "train_log.jsonl")
    torch.save(
        {
            "step": step,
            "adapter": handle.adapter_state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
                "numpy": np.random.get_state(),
                "python": random.getstate(),
            },
        },
        tmp / "state.pt",
    )
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.replace(old)
    tmp.replace(directory)
    shutil.rmtree(old, ignore_errors=True)


def _load_checkpoint(directory: Path, handle: AdapterHandle, optimizer, scheduler) -> int:
    # onto the CPU first: the optimizer moves its state to its parameters' device itself
    state = torch.load(directory / "state.pt", weights_only=False, map_location="cpu")
    handle.load_state(state["adapter"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    return int(state["step"])


# -- the loop ------------------------------------------------------------------------------


class Batcher:
    """Produces ``(hidden_or_ids, attention_mask, rows, cols, targets)`` for a batch."""

    def __init__(self, examples: list[Example], cache, pad_id: int, device: torch.device):
        self.examples = examples
        self.cache = cache
        self.pad_id = pad_id
        self.device = device

    def __call__(self, indices: list[int]):

        if self.cache is not None:
            inputs, mask = self.cache.batch(indices)
        else:
            inputs, mask = pad_batch([self.examples[i].ids for i in indices], self.pad_id)
        rows, cols, targets = [], [], []
        for row, i in enumerate(indices):
            ex = self.examples[i]
            rows += [row] * len(ex.positions)
            cols += ex.positions
            targets += ex.targets
        as_tensor = lambda v: torch.tensor(v, dtype=torch.long, device=self.device)  # noqa: E731
        return (
            inputs.to(self.device),
            mask.to(self.device),
            as_tensor(rows),
            as_tensor(cols),
            as_tensor(targets),
        )


def routing_state(handle: AdapterHandle, batch):
    """The routers' view of ``batch`` (real tokens, prompt tokens) while it is in flight."""
    _, mask, rows, cols, _ = batch
    return handle.token_mask(mask, prompt_mask(mask, rows, cols))


def answer_loss(
    model,
    handle: AdapterHandle,
    batch,
    start: int | None,
    autocast,
    set_routing: bool = True,
    per_example: bool = True,
) -> torch.Tensor:
    """Cross-entropy on the answer token(s); ``start`` is the cached split (None: full depth).

    ``per_example`` (``train.loss: per_example``, the default): the mean over each item's
    answer tokens, then over the items, ``L = (1/B) sum_i (1/n_i) sum_j CE_ij``, so every
    item weighs the same whatever its answer's length; otherwise (``per_token``) every
    answer token weighs the same, ``L = sum_ij CE_ij / sum_i n_i`` (long answers weigh
    more). With one-token answers both are the same number.

    ``set_routing=False``: the caller already holds :func:`routing_state` (the training
    loop does, over the backward pass too: gradient checkpointing reruns the forward of
    each layer there, and the routers must see the same token masks as the first time).
    """

    inputs, mask, rows, cols, targets = batch
    with autocast, routing_state(handle, batch) if set_routing else nullcontext():
        if start is None:
            hidden = full_forward(model, inputs, mask)
        else:
            hidden = upper_forward(model, inputs, mask, start)
        logits = logits_at(model, hidden, rows, cols)
    if not per_example:
        return F.cross_entropy(logits.float(), targets)
    per_token = F.cross_entropy(logits.float(), targets, reduction="none")
    counts = torch.zeros(inputs.shape[0], dtype=per_token.dtype, device=per_token.device)
    counts = counts.index_add_(0, rows, torch.ones_like(per_token))
    items = (counts > 0).sum()
    return (per_token / counts[rows]).sum() / items


def optimizer_step(
    model, handle, optimizer, scheduler, batch, start, autocast, labels, max_grad_norm, diverged,
    per_example: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """One optimizer step of a run: task loss + the method's auxiliary loss, backward,
    clipping, AdamW, scheduler and the method's per-step hook; ``(loss, aux, grad_norm)``.

    Task labels and the routers' token masks stay set through backward: with gradient
    checkpointing each layer's forward (routing included) is recomputed there. A
    non-finite loss raises ``diverged(value)`` before anything is updated.
    """
    with handle.task_labels(labels), routing_state(handle, batch):
        loss = answer_loss(model, handle, batch, start, autocast, set_routing=False, per_example=per_example)
        aux = handle.aux_loss()
        total = loss if aux is None else loss + aux
        if not torch.isfinite(total):
            raise diverged(float(total))
        total.backward()
    grad_norm = None
    if max_grad_norm:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(handle.trainable_parameters(), max_grad_norm))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    handle.after_optimizer_step()
    return loss, aux, grad_norm



# -- one run, in parts -----------------------------------------------------------------------


@dataclass
class RunSetup:
    """Everything a run's training loop needs, built by :func:`prepare_run`."""

    base: BaseModel
    handle: AdapterHandle
    examples: list[Example]
    pool: list[int]  # indices of the examples this run trains on
    settings: RunSettings  # steps, warm-up, lr, tasks: fixed by the plan

    @property
    def n_steps(self) -> int:
        return self.settings.steps
    cache: Any  # LowerCache or None
    truncated: int
    cache_seconds: float


def load_training_items(config: dict[str, Any], split: str = "main") -> list[dict[str, Any]]:
    """The training items the data step wrote: the study's (``main``), or the training items
    minus the validation split (``tune``: the tune stage's runs)."""
    path = Path(config["out_dir"]) / "data" / ("tune/train.jsonl" if split == "tune" else "train.jsonl")
    if not path.exists():
        raise DataError(
            f"{path}: file not found; write the study's data first "
            "(`python -m harness data --config <config>`, or let snakemake run the data rule)"
        )
    return load_jsonl(path)


def prepare_run(config: dict[str, Any], run) -> RunSetup:
    """Load the base model, build the training examples and their lower-layer cache, insert
    the method (initialised from the run's seed) with its components, and fix the run's
    training items, step count and learning rate."""

    train_cfg, model_cfg = config["train"], config["model"]
    base = load_base(model_cfg, cache_root(config))
    items = load_training_items(config, getattr(run, "split", "main"))
    examples, truncated = build_examples(base.tokenizer, items, train_cfg["max_length"])
    t_cache = time.perf_counter()
    cache = None
    if base.split_start is not None:
        cache = cached_lower(
            base.model,
            base.fingerprint,
            [e.ids for e in examples],
            base.split_start,
            base.tokenizer.pad_token_id,
            base.lower_cache_dir,
            desc="lower layers (train)",
        )
    cache_seconds = time.perf_counter() - t_cache
    method = get_method(run.method)
    method_config = method.make_config(**run.method_config)
    out_dir = Path(config["out_dir"])
    handle = attach_method(base, method, method_config, [out_dir / c for c in run.components], seed=run.seed)
    if train_cfg["gradient_checkpointing"]:
        # non-reentrant: recomputes each decoder layer inside backward (see optimizer_step)
        kwargs = {"use_reentrant": False}
        if hasattr(base.model, "activation_checkpointing_enable"):  # transformers >= 5.x
            base.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            base.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    settings = run.settings
    if settings is not None and settings.lr is None:  # the tune stage's choice, made since planning
        settings = dataclasses.replace(settings, lr=tuned_rate(config, run))
    if settings is None or settings.steps is None:
        # counted in epochs over items known only after the data step (lm-eval sources), or a
        # run built outside a plan (compose): the plan's own rule, with the items now known
        counts = dict(Counter(e.task for e in examples))
        lr = settings.lr if settings is not None else None
        settings = resolve_settings(train_cfg, method, method_config, run.tasks, run.steps, counts, lr)
    pool = select_examples(examples, list(settings.tasks) if settings.tasks is not None else None)
    return RunSetup(base, handle, examples, pool, settings, cache, truncated, cache_seconds)


@dataclass
class LoopState:
    """Where the loop starts (after a resume) and what it has measured so far."""

    first_step: int = 0
    resumed_from: int | None = None
    log_lines: list[str] = field(default_factory=list)
    step_times: list[float] = field(default_factory=list)
    #: tokens (prompt + answer, no padding) of the batches trained in this process
    tokens: int = 0


def resume_or_start(run_dir: Path, handle: AdapterHandle, optimizer, scheduler) -> LoopState:
    """Continue from the run's last checkpoint if there is one (optimizer, scheduler, RNGs
    and the log up to that step), else start afresh (an old log is removed)."""
    ckpt_dir = run_dir / "checkpoints" / "last"
    log_path = run_dir / "train_log.jsonl"
    if (ckpt_dir / "state.pt").exists():
        step = _load_checkpoint(ckpt_dir, handle, optimizer, scheduler)
        lines = [
            line for line in (ckpt_dir / "train_log.jsonl").read_text().splitlines()
            if line and json.loads(line)["step"] < step
        ]
        return LoopState(step, step, lines)
    if log_path.exists():
        log_path.unlink()
    return LoopState()


def train_loop(config: dict[str, Any], run, run_dir: Path, setup: RunSetup, optimizer, scheduler,
               state: LoopState, progress: bool, stop_after: int | None) -> bool:
    """Run the optimizer steps from ``state.first_step``, logging each step to
    ``train_log.jsonl`` and checkpointing every ``train.checkpoint_every`` steps. Returns
    False when ``stop_after`` ended it early (tests simulate a killed job with it)."""

    train_cfg = config["train"]
    base, handle, examples, pool = setup.base, setup.handle, setup.examples, setup.pool
    autocast = autocast_context(base.device, config["model"]["dtype"])
    batcher = Batcher(examples, setup.cache, base.tokenizer.pad_token_id, base.device)
    method = handle.method
    log_path = run_dir / "train_log.jsonl"
    ckpt_dir = run_dir / "checkpoints" / "last"
    base.model.train()
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
    last_finite = None
    with open(log_path, "w") as log:
        for line in state.log_lines:
            log.write(line + "\n")
        bar = tqdm(
            range(state.first_step, setup.n_steps),
            initial=state.first_step,
            total=setup.n_steps,
            desc=run.run_id,
            disable=not progress,
            mininterval=2,
            dynamic_ncols=True,
        )
        for step in bar:
            t0 = time.perf_counter()
            indices = [pool[j] for j in batch_schedule(len(pool), train_cfg["batch_size"], run.seed, step)]
            batch = batcher(indices)
            labels = [examples[i].task for i in indices] if method.needs_task_labels else None

            def diverged(value: float, step: int = step, last: float | None = last_finite) -> TrainingDiverged:
                return TrainingDiverged(
                    f"run {run.run_id}: the loss became {value} at step {step} "
                    f"(run folder {run_dir}); last finite loss: {last}. No metrics "
                    "were written; lower train.lr or check the method."
                )

            loss, aux, grad_norm = optimizer_step(
                base.model, handle, optimizer, scheduler, batch, base.split_start if setup.cache is not None else None,
                autocast, labels, train_cfg["max_grad_norm"], diverged,
                per_example=train_cfg.get("loss", "per_example") == "per_example",
            )
            dt = time.perf_counter() - t0
            loss_value = float(loss.detach())
            last_finite = round(loss_value, 6)
            state.step_times.append(dt)
            state.tokens += sum(len(examples[i].ids) for i in indices)
            record = {
                "step": step,
                "loss": round(loss_value, 6),
                "aux_loss": None if aux is None else round(float(aux.detach()), 6),
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": None if grad_norm is None else round(grad_norm, 6),
                "step_time": round(dt, 4),
            }
            if step % LOG_LOAD_EVERY == 0 or step == setup.n_steps - 1:
                record["expert_load"] = handle.expert_load() or None
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
            done = step + 1
            every = train_cfg["checkpoint_every"]
            if every and done % every == 0 and done < setup.n_steps:
                _save_checkpoint(ckpt_dir, handle, optimizer, scheduler, done, log_path)
            if stop_after is not None and done - state.first_step >= stop_after:
                return False
        bar.close()
    return True


def peak_memory_mib(device: torch.device) -> dict[str, float | None]:
    """The training process's measured peak memory: its resident set (RSS, the whole process:
    interpreter, libraries, base model, lower-layer cache) and, on CUDA, the largest
    ``torch.cuda.max_memory_allocated`` since the loop reset it."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    cuda = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {"peak_rss_mib": round(rss, 1), "cuda_max_allocated_mib": None if cuda is None else round(cuda, 1)}


def estimated_memory_mib(run, setup: RunSetup, train_cfg: dict[str, Any]) -> float | None:
    """:mod:`harness.plan.memory`'s estimate of one training step's allocated memory for this
    run at its real longest sequence (``None`` for a component or a run outside a plan)."""
    if getattr(run, "row", None) is None:
        return None
    longest = max(len(setup.examples[i].ids) for i in setup.pool)
    first = setup.base.split_start if setup.cache is not None else min(setup.base.layer_ids)
    table = memory_table(
        [run.row], setup.base.model.config, batch_size=train_cfg["batch_size"], seq_len=longest,
        dtype=str(setup.base.dtype).removeprefix("torch."),
        gradient_checkpointing=bool(train_cfg.get("gradient_checkpointing")),
        module_shapes=setup.base.targets, first_adapted_layer=first,
    )
    return round(float(table.iloc[0]["allocated"]) * 1024, 1)


def measured_cost(run, run_dir: Path, setup: RunSetup, state: LoopState, train_cfg: dict[str, Any]) -> dict[str, Any]:
    """What training cost, measured in this process (as peft's method comparison records it):
    tokens per second of the training loop, peak memory beside the estimate, adapter file size."""
    loop_s = sum(state.step_times)
    adapter = run_dir / "adapter" / "adapter.safetensors"
    return {
        "tokens": state.tokens,
        "tokens_per_s": round(state.tokens / loop_s, 1) if loop_s > 0 else None,
        **peak_memory_mib(setup.base.device),
        "estimated_allocated_mib": estimated_memory_mib(run, setup, train_cfg),
        "adapter_bytes": adapter.stat().st_size if adapter.exists() else None,
        "resumed": state.resumed_from is not None,
    }


def run_summary(run, run_dir: Path, setup: RunSetup, state: LoopState, train_cfg: dict[str, Any],
                wall_start: float) -> dict[str, Any]:
    """``train.json``: what trained, its parameters, losses, timings and provenance."""

    handle, examples, pool = setup.handle, setup.examples, setup.pool
    all_losses = [json.loads(line)["loss"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]
    count = handle.analytic_count()
    steps = state.step_times
    wall_s = round(time.perf_counter() - wall_start, 3)
    return {
        "run_id": run.run_id,
        "method": run.method,
        "variant": run.tag,
        "granularity": run.granularity,
        "seed": run.seed,
        "steps": setup.n_steps,
        "batch_size": train_cfg["batch_size"],
        "examples": len(pool),
        "example_tasks": dict(sorted(Counter(examples[i].task for i in pool).items())),
        "truncated_examples": setup.truncated,
        "final_loss": round(statistics.fmean(all_losses[-10:]), 6),
        "first_loss": all_losses[0],
        "params": {
            "total": count.total,
            "activated": count.activated,
            "router": count.router,
            # adapter parameters of all stages (a staged method's frozen components too)
            "trainable_numel": handle.adapter_numel(),
            "trained_in_this_run": handle.trainable_numel(),
        },
        "method_config": run.method_config,
        "settings": setup.settings.to_dict(),
        "method_source": getattr(run, "method_source", None),
        "lower_layer_cache": {
            "enabled": setup.cache is not None,
            "split_layer": setup.base.split_start if setup.cache is not None else None,
            "seconds": round(setup.cache_seconds, 3),
            # the one-time build (shared by every run of the study) is not this run's training
            "built_here": bool(setup.cache is not None and setup.cache.built_here),
        },
        "resumed_from_step": state.resumed_from,
        "timing": {
            "wall_s": wall_s,
            # wall time without the lower-layer cache (built here, waited for or loaded):
            # the one-time build is the study's, not this run's
            "train_s": round(wall_s - round(setup.cache_seconds, 3), 3),
            "cache_build_s": round(setup.cache_seconds, 3)
            if setup.cache is not None and setup.cache.built_here else 0.0,
            "train_loop_s": round(sum(steps), 3),
            "median_step_s": round(statistics.median(steps), 4) if steps else None,
        },
        "cost": measured_cost(run, run_dir, setup, state, train_cfg),
        "device": str(setup.base.device),
        "effective_config": run.effective,
        "provenance": provenance(),
    }


def train_run(
    config: dict[str, Any],
    run,
    run_dir: Path,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train one run (or component) into ``run_dir`` and return its summary (also written to
    ``train.json``). A killed run resumes from its last checkpoint; ``stop_after`` ends the
    process early after that many steps (nothing final is written then)."""
    wall_start = time.perf_counter()
    train_cfg = config["train"]
    torch.set_num_threads(train_cfg["threads"])
    seed_everything(run.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    setup = prepare_run(config, run)
    optimizer = make_optimizer(setup.handle, train_cfg, setup.settings.lr)
    scheduler = make_scheduler(optimizer, train_cfg, setup.n_steps, setup.settings.warmup_steps)
    state = resume_or_start(run_dir, setup.handle, optimizer, scheduler)
    if state.resumed_from is not None:
        print(f"resumed {run.run_id} from step {state.resumed_from} of {setup.n_steps}", flush=True)
    if not train_loop(config, run, run_dir, setup, optimizer, scheduler, state, progress, stop_after):
        return {"stopped_at": state.first_step + (stop_after or 0)}
    setup.handle.save(run_dir / "adapter", extra={"run_id": run.run_id, "base_model": str(setup.base.source.path)})
    summary = run_summary(run, run_dir, setup, state, train_cfg, wall_start)
    atomic_write_json(run_dir / "train.json", summary)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return summary


__all__ = ["TrainingDiverged", "prepare_run", "train_run"]
