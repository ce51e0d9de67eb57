"""Rebuilding a run's model from its folder: base model, plugins, method, adapter weights.

Every run folder holds ``run.json`` (the run's spec: method, its solved config, seed,
the model section, the cache location and the plugins the method needs), written before
training or evaluation starts, so a folder alone is enough to score it again, e.g. with
``lm_eval --model moe-lora --model_args run_dir=<folder>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from harness.adapters import get_method, load_plugin
from harness.common.files import atomic_write_json, read_json
from harness.model.base import attach_method, load_base
from harness.model.load import cache_root


def write_run_spec(config: dict[str, Any], run, run_dir: Path) -> dict[str, Any]:
    spec = {
        "run_id": run.run_id,
        "study": config["study"],
        "method": run.method,
        "variant": run.tag,
        "granularity": run.granularity,
        "seed": run.seed,
        "method_config": run.method_config,
        "plugins": list(config.get("plugins") or []),
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


class ResultExists(RuntimeError):
    """A finished result that a command would overwrite; it never does."""


def refuse_to_overwrite(result: Path, what: str) -> None:
    if result.exists():
        raise ResultExists(
            f"{result} exists: this run is already {what} and its results are never "
            "overwritten. Delete that file (or the run folder) by hand to redo it."
        )


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


class MissingWeightsError(FileNotFoundError):
    """A run folder without its trained adapter; the message gives the command that
    restores it."""


def read_run_spec(run_dir: str | Path) -> dict[str, Any]:
    """``run.json`` of a run folder, or a clear error naming what was given instead."""
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").exists():
        raise FileNotFoundError(
            f"{run_dir} is not a run folder (no run.json); run folders live under "
            "<out_dir>/runs/ and are written by `python -m harness train` / `evaluate`"
        )
    return read_json(run_dir / "run.json")


def load_run_model(run_dir: str | Path, device: str = "auto") -> LoadedRun:
    """The run's model ready to score: the base model, the plugins its method needs
    (``run.json``'s ``plugins``), the method with its components and trained weights."""


    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    for plugin in spec.get("plugins") or []:
        load_plugin(plugin)
    cache = cache_root({"cache_dir": spec.get("cache_dir")})
    model_cfg = spec["model"]
    base = load_base(model_cfg, cache, device if device != "auto" else None)
    handle = None
    if spec["method"] != "base":
        weights = run_dir / "adapter" / "adapter.safetensors"
        if not weights.exists():
            raise MissingWeightsError(
                f"{weights} is missing (weights are never committed). Restore them first: "
                f"python -m harness restore --config <the config of study {spec.get('study')!r}> "
                f"--run {run_dir} (retrains the run deterministically and checks it against its "
                "stored log; or let snakemake do it: it restores missing weights a job needs)"
            )
        method = get_method(spec["method"])
        config = method.make_config(**spec["method_config"])
        handle = attach_method(base, method, config, [run_dir / p for p in spec.get("components", [])])
        handle.load_state(load_file(str(weights)))
    base.model.eval()
    return LoadedRun(
        base.model, base.tokenizer, handle, spec, base.split_start, base.fingerprint, base.lower_cache_dir
    )
