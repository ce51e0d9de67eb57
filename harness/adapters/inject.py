"""Putting adapters into a model and the handle the training loop talks to.

:func:`apply_method` freezes the model, lets the method insert its layers,
checks the method's analytic parameter count against the real trainable
parameters (a plugin that miscounts is refused here, with both numbers), and
returns an :class:`AdapterHandle`.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.adapters.base import AdapterLayer, Method, MethodConfig
from harness.adapters.errors import CountMismatchError
from harness.adapters.grid import ParamCount, TargetShape
from harness.adapters.routing import TokenBatch


def trainable_numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


class AdapterHandle:
    """The adapted model plus the three training-loop calls, gathered over all layers.

    * :meth:`aux_loss` — sum of every module's auxiliary loss (or ``None``);
    * :meth:`after_optimizer_step` — call once after each optimizer step;
    * :meth:`expert_load` — per layer, the share of the last batch each expert received;
    * :meth:`recording_routing` / :meth:`routing_shares` — evaluation: each token's expert
      shares per routed layer.
    """

    def __init__(
        self,
        model: nn.Module,
        method: Method,
        config: MethodConfig,
        targets: list[TargetShape],
    ):
        self.model = model
        self.method = method
        self.config = config
        self.targets = targets
        self.hook_modules = {
            name: module
            for name, module in model.named_modules()
            if callable(getattr(module, "after_optimizer_step", None))
            and callable(getattr(module, "aux_loss", None))
            and callable(getattr(module, "expert_load", None))
        }
        #: adapter parameters trained by an earlier stage and frozen here (MoA's task LoRAs)
        self.frozen: list[nn.Parameter] = []

    # -- counting ---------------------------------------------------------------------
    def analytic_count(self) -> ParamCount:
        return self.method.count_model(self.config, self.targets)

    def trainable_numel(self) -> int:
        """Parameters this run trains."""
        return trainable_numel(self.model)

    def add_frozen(self, params: list[nn.Parameter]) -> None:
        """Freeze adapter parameters that an earlier stage trained (they still count)."""
        for p in params:
            p.requires_grad_(False)
            self.frozen.append(p)

    def adapter_numel(self) -> int:
        """Adapter parameters trained in any stage: this run's plus the frozen earlier stages'."""
        return self.trainable_numel() + sum(p.numel() for p in self.frozen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- training-loop interface ------------------------------------------------------
    def aux_loss(self) -> torch.Tensor | None:
        losses = [m.aux_loss() for m in self.hook_modules.values()]
        losses = [loss for loss in losses if loss is not None]
        return torch.stack(losses).sum() if losses else None

    def after_optimizer_step(self) -> None:
        for module in self.hook_modules.values():
            module.after_optimizer_step()

    def expert_load(self) -> dict[str, list[float]]:
        out = {}
        for name, module in self.hook_modules.items():
            load = module.expert_load()
            if load is not None:
                out[name] = [round(v, 6) for v in load.float().cpu().tolist()]
        return out

    @contextlib.contextmanager
    def recording_routing(self) -> Iterator[None]:
        """While active, every adapter layer keeps its last forward's per-token expert
        shares (:meth:`routing_shares`)."""
        layers = [m for m in self.model.modules() if isinstance(m, AdapterLayer)]
        for m in layers:
            m.record_routing = True
        try:
            yield
        finally:
            for m in layers:
                m.record_routing = False
                m.routing_shares = None

    def routing_shares(self) -> dict[str, torch.Tensor]:
        """Module name -> ``(N, E)`` expert shares of each token of the last forward (routed
        layers only; empty when nothing routes per token)."""
        return {
            name: m.routing_shares
            for name, m in self.model.named_modules()
            if isinstance(m, AdapterLayer) and m.routing_shares is not None
        }

    @contextlib.contextmanager
    def token_mask(
        self, mask: torch.Tensor | None, prompt_mask: torch.Tensor | None = None
    ) -> Iterator[None]:
        """Mark real tokens (``attention_mask``) for routers while a forward pass runs.

        ``prompt_mask`` (optional, same shape) marks the prompt's tokens only (not the
        trained answer tokens after it); modules with a ``prompt_mask`` attribute get it.
        """
        flat = None if mask is None else mask.reshape(-1).bool()
        with self._set_on_modules(
            token_mask=flat,
            tokens=TokenBatch(flat),
            prompt_mask=None if prompt_mask is None else prompt_mask.reshape(-1).bool(),
        ):
            yield

    @contextlib.contextmanager
    def task_labels(self, tasks: list[str] | None) -> Iterator[None]:
        """Each sequence's task (names, one per batch row) for methods that set
        ``needs_task_labels``, while a forward pass runs; ``None``: no labels."""
        labels = None if tasks is None else self.method.task_label_ids(self.config, tasks)
        with self._set_on_modules(task_labels=labels):
            yield

    @contextlib.contextmanager
    def _set_on_modules(self, **values: torch.Tensor | None) -> Iterator[None]:
        """Set each attribute on the modules that declare it; reset to ``None`` afterwards."""
        touched = []
        for module in self.model.modules():
            for name, value in values.items():
                if hasattr(module, name):
                    setattr(module, name, value)
                    touched.append((module, name))
        try:
            yield
        finally:
            for module, name in touched:
                setattr(module, name, None)

    # -- saving and loading -----------------------------------------------------------
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable parameters and the buffers of adapter modules (e.g. SMoRA's bias)."""
        state = {n: p.detach() for n, p in self.model.named_parameters() if p.requires_grad}
        adapter_modules = {n for n, m in self.model.named_modules() if _is_adapter_module(m)}
        for name, buf in self.model.named_buffers():
            owner = name.rpartition(".")[0]
            if owner in adapter_modules and buf is not None:
                state[name] = buf.detach()
        return {k: v.contiguous().cpu() for k, v in state.items()}

    def save(self, directory: str | Path, extra: dict[str, Any] | None = None) -> None:
        """``adapter.safetensors`` (weights and adapter buffers) and ``adapter.json`` (method,
        config, targets, ``extra``), each written atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / "adapter.safetensors.tmp"
        save_file(self.adapter_state_dict(), str(tmp))
        tmp.replace(directory / "adapter.safetensors")
        meta = {
            "method": self.method.name,
            "config": self.config.to_dict(),
            "targets": [t.name for t in self.targets],
            **(extra or {}),
        }
        tmp_json = directory / "adapter.json.tmp"
        tmp_json.write_text(json.dumps(meta, indent=2, default=str) + "\n")
        os.replace(tmp_json, directory / "adapter.json")

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters()) | dict(self.model.named_buffers())
        missing = sorted(set(self.adapter_state_dict()) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise KeyError(
                f"adapter weights do not fit this model: missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}"
            )
        with torch.no_grad():
            for name, value in state.items():
                own[name].copy_(value)


def _is_adapter_module(module: nn.Module) -> bool:
    return isinstance(module, AdapterLayer) or type(module).__module__.startswith("peft.")


def apply_method(
    model: nn.Module, method: Method, config: MethodConfig, targets: list[TargetShape]
) -> AdapterHandle:
    """Freeze ``model``, insert the method's adapter on ``targets`` and check its count."""
    model.requires_grad_(False)
    method.apply(model, targets, config)
    handle = AdapterHandle(model, method, config, targets)
    analytic = handle.analytic_count().total
    real = handle.trainable_numel()
    if analytic != real:
        raise CountMismatchError(
            f"method {method.name!r} reports {analytic:,} trainable parameters but its modules "
            f"hold {real:,} (difference {real - analytic:+,}); fix its count() so tables are honest"
        )
    return handle
