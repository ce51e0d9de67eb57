"""Contenders: a method at one variant, on its own copy of the adapted layers (the frozen
weights shared, not copied), with AdamW and the scheduler as a run builds them."""

from __future__ import annotations

import copy
import gc
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from harness.adapters import apply_method, get_method, read_component
from harness.adapters.core import choose_path
from harness.model.lm_eval_model import score_logprobs
from harness.model.load import decoder_layers
from harness.run.train import make_optimizer, make_scheduler, optimizer_step

if TYPE_CHECKING:
    from harness.bench.context import BenchContext


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


def note(ctx: BenchContext, text: str) -> None:
    if text not in ctx.notes:
        ctx.notes.append(text)


def install(ctx: BenchContext, layers: dict[int, nn.Module]) -> None:
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
    component_dirs: list[Path] | None = None,
) -> Contender:
    """Copies of the adapted layers (frozen weights shared), the method applied to them (with
    the components a staged run is built on, loaded and frozen), AdamW and the scheduler
    as :func:`harness.run.train.train_run` builds them."""
    train_cfg = ctx.config["train"]
    method = get_method(method_name)
    layers = {i: _share_frozen(layer) for i, layer in ctx.original_layers.items()}
    install(ctx, layers)
    torch.manual_seed(ctx.seed)
    handle = apply_method(ctx.model, method, method_config, ctx.targets)
    stage = None
    if component_dirs:  # a staged method's last stage: load and freeze its components
        missing = [d for d in component_dirs if not (d / "adapter" / "adapter.safetensors").exists()]
        if missing:
            stage = "components not trained here: their parameters train too"
            note(ctx, f"{key}: {len(missing)} of {len(component_dirs)} components ({missing[0]}, ...) "
                       "have no trained weights here, so the step trains them too instead of loading "
                       "them frozen (an upper bound on the real step); `snakemake bench` trains them first")
        else:
            method.load_components(handle, [read_component(d) for d in component_dirs])
            stage = "components loaded and frozen"
    if hasattr(ctx.model, "peft_config"):  # peft leaves its config on the model; each copy is separate
        del ctx.model.peft_config
    ctx.model.to(ctx.device)
    optimizer = make_optimizer(handle, train_cfg, train_cfg["lr"])
    scheduler = make_scheduler(optimizer, train_cfg, 1_000_000, 0)
    info = {"trainable_params": handle.trainable_numel(), **method.describe(method_config)}
    if stage:
        info["stage"] = stage
    path = getattr(method_config, "path", None)
    if path is not None:
        info["path"] = choose_path(path, method_config.num_experts, method_config.top_k)
    install(ctx, ctx.original_layers)
    return Contender(
        key, method_name, variant, granularity, method_config, layers, handle, optimizer, scheduler,
        full_depth, info,
    )


def train_step(ctx: BenchContext, c: Contender, meter: SavedTensorMeter | None = None) -> float:
    """One optimizer step, :func:`harness.run.train.optimizer_step` as the training loop calls it."""
    batch = ctx.train_full if c.full_depth else ctx.train_cached
    start = None if c.full_depth else ctx.start
    labels = ctx.train_tasks if c.handle.method.needs_task_labels else None
    with meter.hooks() if meter is not None else nullcontext():
        loss, _, _ = optimizer_step(
            ctx.model, c.handle, c.optimizer, c.scheduler, batch, start, ctx.autocast(), labels,
            ctx.config["train"]["max_grad_norm"],
            lambda value: RuntimeError(f"bench: {c.key}: the loss became {value}"),
            per_example=ctx.config["train"].get("loss", "per_example") == "per_example",
        )
    value = float(loss.detach())
    c.losses.append(value)
    return value


@torch.no_grad()
def eval_batch(ctx: BenchContext, c: Contender) -> torch.Tensor:
    """The scoring forward of :class:`harness.model.lm_eval_model.HarnessLM` on the evaluation batch
    (real tokens marked for the routers, the same autocast, as there)."""
    inputs, mask, rows, cols = ctx.eval_full if c.full_depth else ctx.eval_cached
    start = None if c.full_depth else ctx.start
    with c.handle.token_mask(mask), ctx.autocast():
        return score_logprobs(ctx.model, inputs, mask, start, rows, cols)


def state_bytes(c: Contender) -> int:
    """Adapter parameters + their gradients + the optimizer's state tensors."""
    params = [p for group in c.optimizer.param_groups for p in group["params"]]
    n = sum(p.numel() * p.element_size() for p in params) * 2  # values and gradients
    for state in c.optimizer.state.values():
        n += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.dim() > 0)
    return n


def release(*contenders: Contender) -> None:
    """Drop the contenders' layers, adapters and optimizer state (one garbage collection)."""
    for c in contenders:
        c.layers.clear()
        c.handle = c.optimizer = c.scheduler = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
