"""Rebuilding a run's model from its folder: base model, method, adapter weights.

Every run folder holds ``run.json`` (the run's spec: method, its solved config,
seed, the model section and cache location), written before training or
evaluation starts, so a folder alone is enough to score it again, e.g. with
``lm_eval --model moe-lora --model_args run_dir=<folder>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.io import atomic_write_json, read_json


def write_run_spec(config: dict[str, Any], run, run_dir: Path) -> dict[str, Any]:
    spec = {
        "run_id": run.run_id,
        "study": config["study"],
        "method": run.method,
        "variant": run.tag,
        "granularity": run.granularity,
        "seed": run.seed,
        "method_config": run.method_config,
        "model": config["model"],
        "cache_dir": config["cache_dir"],
        "data_dir": str(Path(config["out_dir"]) / "data"),
        "effective_config": run.effective,
    }
    if getattr(run, "components", None):
        # folders trained by earlier jobs (MoA's task LoRAs), relative to this run folder
        spec["components"] = [
            os.path.relpath(Path(config["out_dir"]) / c, run_dir) for c in run.components
        ]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "run.json"
    if path.exists():
        old = read_json(path)
        if old.get("effective_config") != spec["effective_config"]:
            raise RunFolderConflict(
                f"{run_dir} already holds a run with a different effective config "
                f"({_first_difference(old.get('effective_config'), spec['effective_config'])}); "
                "it is never overwritten. Move or delete that folder by hand if it is obsolete."
            )
        if old == spec:
            return spec
    atomic_write_json(path, spec)
    return spec


class RunFolderConflict(RuntimeError):
    """A run folder exists but holds a different run: refuse instead of overwriting it."""


def _first_difference(old: Any, new: Any, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else key)
    return f"{path or 'config'}: stored {old!r}, now {new!r}"


@dataclass
class LoadedRun:
    model: torch.nn.Module
    tokenizer: Any
    handle: Any
    spec: dict[str, Any]
    split_start: int | None
    fingerprint: str
    cache_dir: Path


def load_run_model(run_dir: str | Path, device: str = "auto") -> LoadedRun:
    from harness.methods import get_method
    from harness.methods.inject import apply_method
    from harness.modeling import (
        adapted_layer_indices,
        cache_root,
        load_base_model,
        resolve_model,
        target_shapes,
    )
    from harness.split import model_fingerprint
    from harness.train import select_device

    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run folder (no run.json); run folders live under "
            "<out_dir>/runs/ and are written by `python -m harness train` / `evaluate`"
        )
    spec = read_json(run_dir / "run.json")
    model_cfg = spec["model"]
    cache = cache_root({"cache_dir": spec.get("cache_dir")})
    source = resolve_model(model_cfg, cache)
    dtype = getattr(torch, model_cfg["dtype"])
    model, tokenizer = load_base_model(source, dtype)
    target_device = select_device(device if device != "auto" else model_cfg.get("device", "auto"))
    model.to(target_device)
    layer_ids = adapted_layer_indices(model, model_cfg["adapt_layers"])
    handle = None
    if spec["method"] != "base":
        weights = run_dir / "adapter" / "adapter.safetensors"
        if not weights.exists():
            raise FileNotFoundError(
                f"{weights} is missing: the run has no trained adapter here (weights are not "
                "committed). Retrain it with `snakemake --forcerun train` for this run, or "
                "`python -m harness train --config <config> --run "
                f"{spec['run_id']}`"
            )
        from safetensors.torch import load_file

        method = get_method(spec["method"])
        config = method.make_config(**spec["method_config"])
        targets = target_shapes(model, model_cfg["target_modules"], layer_ids)
        handle = apply_method(model, method, config, targets)
        method.load_components(handle, [run_dir / p for p in spec.get("components", [])])
        model.to(target_device)
        handle.load_state(load_file(str(weights)))
    model.eval()
    start = min(layer_ids) if model_cfg.get("lower_layer_cache", True) and min(layer_ids) > 0 else None
    return LoadedRun(
        model, tokenizer, handle, spec, start, model_fingerprint(source.path, dtype), cache / "lower"
    )
