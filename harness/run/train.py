"""Training one run: the same loop, optimizer, schedule, batches and prompts for every method.

The loop knows methods only through :class:`~harness.adapters.inject.AdapterHandle`:
the task loss (cross-entropy on the answer token(s), logits computed only there)
plus ``handle.aux_loss()``, then ``handle.after_optimizer_step()`` once per
step. Batches come in a fixed order derived from the seed alone, so every
method sees the same data in the same order (paired comparisons across methods).

Several ranks (``train.processes: N``, launched with torchrun): the global batch and the
seed fix the data order as in one process; each rank trains on its equal shard of every
batch with the trainable parameters wrapped in DDP (nccl on CUDA, gloo on CPU), the loss
is weighted so that DDP's gradient average is the one-process gradient, routing
statistics are summed over the ranks (:mod:`harness.adapters.distributed`) and rank 0
alone writes the log, checkpoints and results.

Resumable: every ``checkpoint_every`` steps the adapter, optimizer, scheduler and
RNG states are written atomically; a killed run continues from there and ends
with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import random
import resource
import shutil
import statistics
import sys
import time
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import get_scheduler

from harness.adapters import AdapterHandle, get_method
from harness.adapters.distributed import across_ranks, reduce_across_ranks, world_size
from harness.common.files import atomic_write_json
from harness.common.lock import keep_across_exec
from harness.common.manifest import data_record, record_files, sha256_file, verify_files
from harness.common.provenance import provenance
from harness.common.state_files import STATE_JSON, StateFileError, load_state, save_state
from harness.data.jsonl import DataError
from harness.data.prompts import training_texts
from harness.data.sources import load_item_file
from harness.model.base import BaseModel, attach_method, autocast_context, load_base
from harness.model.load import cache_root
from harness.model.lower_cache import (
    cached_lower,
    full_forward,
    logits_at,
    pad_batch,
    upper_forward,
)
from harness.model.run_folder import verify_weights
from harness.model.tokens import encode_pair
from harness.plan.memory import memory_table
from harness.plan.study import RunSettings, code_identity, resolve_settings, tuned_rate

LOG_LOAD_EVERY = 10
#: how long a rank waits for the others at a collective (rank 0 builds the cache alone)
RANK_TIMEOUT = timedelta(hours=3)


class CheckpointError(RuntimeError):
    """A run's checkpoint folder that is not resumed from (old pickled format, damaged or
    foreign files); the message names the file and says to delete the folder and rerun."""


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


# -- several ranks (torch.distributed) ------------------------------------------------------


def inside_torchrun() -> bool:
    """True in a process torchrun started (it sets ``RANK`` and ``WORLD_SIZE``)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_command(processes: int, harness_args: list[str]) -> list[str]:
    """The command line that runs ``python -m harness <harness_args>`` as ``processes`` ranks
    on this node (torch.distributed.run, standalone rendezvous on a free port)."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", str(processes), "-m", "harness",
        "--",  # the harness's options are not torchrun's (`--run` would be taken for `--run-path`)
        *harness_args,
    ]


def relaunch_under_torchrun(config: dict[str, Any], harness_args: list[str]) -> None:
    """With ``train.processes: N > 1`` outside torchrun, replace this process by torchrun
    starting ``N`` ranks of the same command (never returns then); otherwise return.
    Refuses ``N`` larger than the visible GPUs when the model goes to CUDA."""
    n = int(config["train"].get("processes", 1))
    if n <= 1 or inside_torchrun():
        return
    batch = config["train"]["batch_size"]
    if batch % n:
        raise ValueError(
            f"train.batch_size = {batch} does not split into {n} equal shards "
            f"(train.processes = {n}); use a batch size divisible by {n}"
        )
    if _uses_cuda(config) and torch.cuda.device_count() < n:
        raise ValueError(
            f"train.processes = {n} but {torch.cuda.device_count()} GPU(s) are visible; ask the "
            "cluster for that many GPUs per train job (docs/cluster.md) or lower train.processes"
        )
    keep_across_exec(config["out_dir"])  # the ranks work under this job's out_dir lock
    sys.stdout.flush()
    sys.stderr.flush()
    command = torchrun_command(n, harness_args)
    os.execv(command[0], command)


def _uses_cuda(config: dict[str, Any]) -> bool:
    return config["model"].get("device", "auto") != "cpu" and torch.cuda.is_available()


def init_ranks(config: dict[str, Any]) -> tuple[int, int, bool]:
    """``(rank, world size, opened)``; inside torchrun with several ranks, the process group
    is initialised here unless the caller already did (``opened`` says which; nccl and this
    rank's GPU on CUDA, gloo on CPU) and the global batch is checked to split into equal
    shards. ``(0, 1, False)`` in one process."""
    if not inside_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, False
    world = int(os.environ["WORLD_SIZE"])
    batch = config["train"]["batch_size"]
    if batch % world:
        raise ValueError(
            f"train.batch_size = {batch} does not split into {world} equal shards "
            f"(train.processes = {world}); use a batch size divisible by {world}"
        )
    opened = not dist.is_initialized()
    if opened:
        # the other ranks wait while rank 0 alone builds what is written once (the lower-layer
        # cache of a large study can take a while): a long collective timeout
        if _uses_cuda(config):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            dist.init_process_group(backend="nccl", timeout=RANK_TIMEOUT)
        else:
            dist.init_process_group(backend="gloo", timeout=RANK_TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), opened


def finish_ranks(opened: bool) -> None:
    """Wait for every rank, then close the process group if :func:`init_ranks` opened it
    (rank 0 then scores alone)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        if opened:
            dist.destroy_process_group()


class StepLoss(torch.nn.Module):
    """One step's loss as a module's forward, so that DDP wraps the adapted model and
    averages the trainable parameters' gradients over the ranks during backward.

    The answer loss of the rank's shard is turned into the global batch's loss with
    :func:`~harness.adapters.distributed.across_ranks` (items, or answer tokens under
    ``per_token``, as the weights), so its value is the global loss and DDP's average
    gives the one-process gradient whatever the shards' token counts."""

    def __init__(self, model: torch.nn.Module, handle: AdapterHandle):
        super().__init__()
        self.model = model
        self.handle = handle

    def forward(self, batch, start, autocast, per_example: bool):
        loss = answer_loss(self.model, self.handle, batch, start, autocast, set_routing=False, per_example=per_example)
        _, _, rows, _, targets = batch
        weight = torch.unique(rows).numel() if per_example else targets.numel()
        weight = torch.tensor(float(weight), device=loss.device)
        loss = across_ranks(lambda total, n: total / n, loss * weight, weight)
        return loss, self.handle.aux_loss()


def wrap_for_ranks(base: BaseModel, handle: AdapterHandle) -> torch.nn.Module:
    """The model wrapped in DDP over the trainable adapter parameters (buffers such as
    SMoRA's bias stay in step through the summed statistics, not by broadcast)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.cuda.current_device()] if base.device.type == "cuda" else None
    # no buffer broadcast before each forward (torch >= 2.13 names it forward_sync_buffers)
    names = inspect.signature(DistributedDataParallel.__init__).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in names else {"broadcast_buffers": False}
    return DistributedDataParallel(StepLoss(base.model, handle), device_ids=device_ids, **no_sync)


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
    save_state(  # safetensors + JSON: reading it back never unpickles (harness.common.state_files)
        tmp,
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
    )
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        directory.replace(old)
    tmp.replace(directory)
    shutil.rmtree(old, ignore_errors=True)


#: the pickled checkpoint file of earlier versions: never read (unpickling runs code)
OLD_CHECKPOINT = "state.pt"


def _has_checkpoint(directory: Path) -> bool:
    return (directory / STATE_JSON).exists() or (directory / OLD_CHECKPOINT).exists()


def _load_checkpoint(directory: Path, handle: AdapterHandle, optimizer, scheduler) -> int:
    """Restore what :func:`_save_checkpoint` wrote; returns the step to continue from. Nothing
    in the folder is executed: an old pickled ``state.pt`` or a damaged or foreign state file is
    refused (:class:`CheckpointError`, naming the file), never unpickled."""
    if not (directory / STATE_JSON).exists():
        raise CheckpointError(
            f"{directory / OLD_CHECKPOINT} is an old-format (pickled) checkpoint, which this version "
            "never loads (unpickling a file can run code). Delete the folder "
            f"{directory} and rerun: the run's training restarts from step 0."
        )
    try:
        # tensors come back on the CPU: the optimizer moves its state to its parameters' device
        state = load_state(directory)
    except StateFileError as exc:
        raise CheckpointError(
            f"cannot resume from {directory}: {exc}. Delete that folder and rerun: the run's "
            "training restarts from step 0."
        ) from None
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
    per_example: bool = True, ddp: torch.nn.Module | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, float | None]:
    """One optimizer step of a run: task loss + the method's auxiliary loss, backward,
    clipping, AdamW, scheduler and the method's per-step hook; ``(loss, aux, grad_norm)``.

    ``ddp`` (several ranks: :func:`wrap_for_ranks`): ``batch`` and ``labels`` are this
    rank's shard; the returned loss and aux are the means over the ranks (the global
    batch's values), the gradients DDP's average.

    Task labels and the routers' token masks stay set through backward: with gradient
    checkpointing each layer's forward (routing included) is recomputed there. A
    non-finite loss raises ``diverged(value)`` before anything is updated.
    """
    with handle.task_labels(labels), routing_state(handle, batch):
        if ddp is None:
            loss = answer_loss(model, handle, batch, start, autocast, set_routing=False, per_example=per_example)
            aux = handle.aux_loss()
        else:
            loss, aux = ddp(batch, start, autocast, per_example)
        total = loss if aux is None else loss + aux
        if ddp is not None:  # every rank sees the same numbers (and stops together)
            means = reduce_across_ranks(torch.stack([loss, total if aux is None else aux, total])) / world_size()
            check, logged_loss, logged_aux = means[2], means[0], None if aux is None else means[1]
        else:
            check, logged_loss, logged_aux = total, loss, aux
        if not torch.isfinite(check):
            raise diverged(float(check))
        total.backward()
        loss, aux = logged_loss, logged_aux
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
    # never trained on: a file that differs from what the data step recorded
    data_dir = Path(config["out_dir"]) / "data"
    verify_files(data_dir, data_record(data_dir), [path.relative_to(data_dir).as_posix()],
                 affects="every run that trains on it")
    return load_item_file(path)  # multiple-choice and generation items (harness.data.sources)


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
    for component in run.components:
        verify_weights(out_dir / component)  # never built on: weights that differ from their record
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


def resume_or_start(run_dir: Path, handle: AdapterHandle, optimizer, scheduler, rank: int = 0) -> LoopState:
    """Continue from the run's last checkpoint if there is one (optimizer, scheduler, RNGs
    and the log up to that step; every rank loads it), else start afresh (rank 0 removes
    an old log)."""
    ckpt_dir = run_dir / "checkpoints" / "last"
    log_path = run_dir / "train_log.jsonl"
    if _has_checkpoint(ckpt_dir):
        step = _load_checkpoint(ckpt_dir, handle, optimizer, scheduler)
        lines = [
            line for line in (ckpt_dir / "train_log.jsonl").read_text().splitlines()
            if line and json.loads(line)["step"] < step
        ]
        return LoopState(step, step, lines)
    if log_path.exists() and rank == 0:
        log_path.unlink()
    return LoopState()


def train_loop(config: dict[str, Any], run, run_dir: Path, setup: RunSetup, optimizer, scheduler,
               state: LoopState, progress: bool, stop_after: int | None, ddp: torch.nn.Module | None = None,
               rank: int = 0) -> bool:
    """Run the optimizer steps from ``state.first_step``, logging each step to
    ``train_log.jsonl`` and checkpointing every ``train.checkpoint_every`` steps. Returns
    False when ``stop_after`` ended it early (tests simulate a killed job with it).

    Several ranks (``ddp`` given): every rank draws the same global batch and trains on its
    shard (rank ``r`` takes the ``r``-th of ``N`` equal consecutive slices); rank 0 alone
    writes the log and the checkpoints, which hold the global batch's numbers."""

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
    shards = world_size() if ddp is not None else 1
    with open(log_path if rank == 0 else os.devnull, "w") as log:
        for line in state.log_lines:
            log.write(line + "\n")
        bar = tqdm(
            range(state.first_step, setup.n_steps),
            initial=state.first_step,
            total=setup.n_steps,
            desc=run.run_id,
            disable=not progress or rank != 0,
            mininterval=2,
            dynamic_ncols=True,
        )
        for step in bar:
            t0 = time.perf_counter()
            indices = [pool[j] for j in batch_schedule(len(pool), train_cfg["batch_size"], run.seed, step)]
            size = len(indices) // shards
            shard = indices[rank * size : (rank + 1) * size]
            batch = batcher(shard)
            labels = [examples[i].task for i in shard] if method.needs_task_labels else None

            def diverged(value: float, step: int = step, last: float | None = last_finite) -> TrainingDiverged:
                return TrainingDiverged(
                    f"run {run.run_id}: the loss became {value} at step {step} "
                    f"(run folder {run_dir}); last finite loss: {last}. No metrics "
                    "were written; lower train.lr or check the method."
                )

            loss, aux, grad_norm = optimizer_step(
                base.model, handle, optimizer, scheduler, batch, base.split_start if setup.cache is not None else None,
                autocast, labels, train_cfg["max_grad_norm"], diverged,
                per_example=train_cfg.get("loss", "per_example") == "per_example", ddp=ddp,
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
            if every and done % every == 0 and done < setup.n_steps and rank == 0:
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
        "processes": train_cfg.get("processes", 1),
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


def training_record(config: dict[str, Any], run) -> dict[str, Any]:
    """What ``train.json`` records of a run's inputs and code (checked by
    :func:`harness.plan.status.invalid_files`): ``inputs``, the sha256 of the training file
    it read (relative to ``out_dir``) and of its components' weights; ``code``, the digests
    of the toolkit and the engine modules (:func:`harness.plan.study.code_identity`; the
    method's own is ``method_source``)."""
    out_dir = Path(config["out_dir"])
    train_file = out_dir / "data" / ("tune/train.jsonl" if getattr(run, "split", "main") == "tune" else "train.jsonl")
    inputs = {train_file.relative_to(out_dir).as_posix(): sha256_file(train_file)}
    for component in getattr(run, "components", None) or []:
        weights = out_dir / component / "adapter" / "adapter.safetensors"
        if weights.is_file():
            inputs[f"{component}/adapter/adapter.safetensors"] = sha256_file(weights)
    return {"inputs": inputs, "code": code_identity()}


def train_run(
    config: dict[str, Any],
    run,
    run_dir: Path,
    progress: bool = True,
    stop_after: int | None = None,
) -> dict[str, Any]:
    """Train one run (or component) into ``run_dir`` and return its summary (also written to
    ``train.json``). A killed run resumes from its last checkpoint; ``stop_after`` ends the
    process early after that many steps (nothing final is written then).

    Inside torchrun with several ranks (``train.processes``): every rank trains its shard,
    rank 0 alone writes; the other ranks return ``{"rank": r}``. The process group is
    closed before returning, so rank 0 may go on alone (scoring)."""
    wall_start = time.perf_counter()
    train_cfg = config["train"]
    torch.set_num_threads(train_cfg["threads"])
    rank, world, opened = init_ranks(config)
    seed_everything(run.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if world > 1 and rank != 0:
        dist.barrier()  # rank 0 first: what is written once (a built model, the lower-layer cache)
    setup = prepare_run(config, run)
    if world > 1 and rank == 0:
        dist.barrier()
    ddp = wrap_for_ranks(setup.base, setup.handle) if world > 1 else None
    optimizer = make_optimizer(setup.handle, train_cfg, setup.settings.lr)
    scheduler = make_scheduler(optimizer, train_cfg, setup.n_steps, setup.settings.warmup_steps)
    state = resume_or_start(run_dir, setup.handle, optimizer, scheduler, rank)
    if state.resumed_from is not None and rank == 0:
        print(f"resumed {run.run_id} from step {state.resumed_from} of {setup.n_steps}", flush=True)
    # an error on one rank ends its process and torchrun ends the others: no barrier then
    finished = train_loop(config, run, run_dir, setup, optimizer, scheduler, state, progress, stop_after, ddp, rank)
    if world > 1:
        finish_ranks(opened)
    if not finished:
        return {"stopped_at": state.first_step + (stop_after or 0), "rank": rank}
    if rank != 0:
        return {"rank": rank}
    setup.handle.save(run_dir / "adapter", extra={"run_id": run.run_id, "base_model": str(setup.base.source.path)})
    summary = run_summary(run, run_dir, setup, state, train_cfg, wall_start)
    summary |= training_record(config, run)
    atomic_write_json(run_dir / "train.json", summary)
    record_files(run_dir, ["adapter/adapter.safetensors", "adapter/adapter.json", "train_log.jsonl", "train.json"])
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return summary


__all__ = ["TrainingDiverged", "prepare_run", "train_run"]
