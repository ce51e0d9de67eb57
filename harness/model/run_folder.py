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

from harness.adapters import PluginError, UnknownMethodError, get_method, load_plugin
from harness.common.files import atomic_write_json, read_json
from harness.common.manifest import manifest_digests, verify_files
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


WEIGHT_FILES = ("adapter/adapter.safetensors", "adapter/adapter.json")


def verify_weights(folder: str | Path) -> None:
    """Raise :class:`harness.common.manifest.VerificationError` when a run or component
    folder's weights differ from what its training (or restore) recorded in its manifest;
    a folder written before manifests has no record and is not checked."""
    folder = Path(folder)
    recorded = manifest_digests(folder) or {}
    names = [n for n in WEIGHT_FILES if n in recorded]
    verify_files(folder, recorded, names, affects=f"every score of the run in {folder} (restore its weights: "
                 "move adapter/ aside and run `python -m harness restore`)")


def import_run_plugins(spec: dict[str, Any], where: str | Path, trust_plugins: bool = False) -> None:
    """Make the run's method available, importing the plugin modules ``run.json`` names only
    when it must and the caller opted in. A built-in method (``methods/``), one an installed
    package registers (entry point) or one this process already loaded (the harness's own
    commands load the plugins of the study's config) needs no import. Otherwise the modules
    are imported only with ``trust_plugins``; without it :class:`PluginError` names them and
    says how to opt in (a folder is data: it never decides which code runs)."""
    name = spec.get("method")
    if name == "base":
        return
    try:
        get_method(name)  # imports installed code only (the built-in table, entry points)
        return
    except UnknownMethodError:
        pass
    plugins = list(spec.get("plugins") or [])
    if not trust_plugins:
        raise PluginError(
            f"{where}: method {name!r} comes from plugin module(s) {plugins or '(none recorded)'}, "
            "which the harness does not import on a run folder's word (importing a module runs "
            "its code). If you trust them, opt in: lm-eval's command line "
            "`--model_args run_dir=...,trust_plugins=true`; Python: "
            "HarnessLM(run_dir=..., trust_plugins=True) or load_run_model(..., trust_plugins=True)"
        )
    for plugin in plugins:
        load_plugin(plugin)


def load_run_model(run_dir: str | Path, device: str = "auto", trust_plugins: bool = False) -> LoadedRun:
    """The run's model ready to score: the base model, the plugins its method needs
    (``run.json``'s ``plugins``, imported only with ``trust_plugins``: :func:`import_run_plugins`), the method with its components and trained weights, each
    weight file verified against its folder's manifest first (:func:`verify_weights`)."""


    run_dir = Path(run_dir)
    spec = read_run_spec(run_dir)
    import_run_plugins(spec, run_dir / "run.json", trust_plugins)
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
        components = [run_dir / p for p in spec.get("components", [])]
        for folder in [*components, run_dir]:
            verify_weights(folder)
        handle = attach_method(base, method, config, components)
        handle.load_state(load_file(str(weights)))
    base.model.eval()
    return LoadedRun(
        base.model, base.tokenizer, handle, spec, base.split_start, base.fingerprint, base.lower_cache_dir
    )
