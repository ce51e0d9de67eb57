"""The one model set-up that training, evaluation and the benchmark share.

:func:`load_base` finds the base model (building or converting it once), loads it with
its tokenizer on the chosen device and says which decoder layers are adapted, which
linear layers are targets and where the frozen lower-layer cache splits the model.
:func:`attach_method` puts a method's adapter into it (initialised from ``seed``) and
loads the components a staged method is built on.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.adapters import (
    AdapterHandle,
    Method,
    MethodConfig,
    TargetShape,
    apply_method,
    read_component,
)
from harness.model.load import (
    ModelSource,
    adapted_layer_indices,
    load_base_model,
    resolve_model,
    target_shapes,
)
from harness.model.lower_cache import model_fingerprint


def autocast_context(device: torch.device, dtype_name: str):
    """The autocast of every forward (training steps, scoring, the benchmark): with
    ``model.dtype`` bfloat16 or float16, ``torch.autocast`` in that dtype on the model's
    device (CPU included: bf16 autocast runs there too); none for float32."""
    if dtype_name == "float32":
        return nullcontext()
    dtype = torch.bfloat16 if dtype_name == "bfloat16" or device.type == "cpu" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def select_device(preference: str) -> torch.device:
    """``cpu``, ``cuda`` (refused without a GPU) or ``auto``: CUDA when available, else CPU."""
    if preference == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("model.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if preference == "cpu":
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass
class BaseModel:
    """A loaded base model and where its adapters go.

    ``split_start``: the first adapted decoder layer when the layers below it are frozen
    and cached (``model.lower_layer_cache``), else ``None`` (full depth every step);
    ``fingerprint`` identifies the checkpoint in cache keys; ``lower_cache_dir`` holds the
    cached hidden states shared by every job of every study on this model.
    """

    model: nn.Module
    tokenizer: Any
    source: ModelSource
    dtype: torch.dtype
    device: torch.device
    layer_ids: list[int]
    targets: list[TargetShape]
    split_start: int | None
    fingerprint: str
    lower_cache_dir: Path


def load_base(model_cfg: dict[str, Any], cache: Path, device: str | None = None) -> BaseModel:
    """The base model of a ``model:`` config section, frozen, in eval mode, on ``device``
    (default: ``model.device``)."""
    source = resolve_model(model_cfg, cache)
    dtype = getattr(torch, model_cfg["dtype"])
    target = select_device(device or model_cfg.get("device", "auto"))
    model, tokenizer = load_base_model(source, dtype)
    model.to(target)
    layer_ids = adapted_layer_indices(model, model_cfg["adapt_layers"])
    targets = target_shapes(model, model_cfg["target_modules"], layer_ids)
    start = min(layer_ids) if model_cfg["lower_layer_cache"] and min(layer_ids) > 0 else None
    return BaseModel(
        model,
        tokenizer,
        source,
        dtype,
        target,
        layer_ids,
        targets,
        start,
        model_fingerprint(source.path, dtype),
        cache / "lower",
    )


def attach_method(
    base: BaseModel,
    method: Method,
    config: MethodConfig,
    component_dirs: list[Path] | None = None,
    seed: int | None = None,
) -> AdapterHandle:
    """Insert ``method``'s adapter into ``base.model`` (initialised from ``seed`` when
    given), load the finished components it is built on, and move it to the device."""
    if seed is not None:
        torch.manual_seed(seed)
    handle = apply_method(base.model, method, config, base.targets)
    method.load_components(handle, [read_component(d) for d in component_dirs or []])
    base.model.to(base.device)
    return handle
