"""The adapted layers' shapes of a study's model, for planning: built on the ``meta`` device
(no weights), or read back from the copy the data step stored.

Building the model to learn its shapes imports transformers' modelling code: about 5 s of
every process that plans (each Snakemake parse, each summary, tables or figures job), most
of a light job's time. The data step (the first job of every DAG) stores the shapes in
``<cache>/shapes/<key>.json``; every later plan reads them. The key is the SHA-256 of what
decides the shapes: the ``model`` section, the content of the model's ``config.json`` (a
local folder, a cached hub model, ``model.config_json`` or the packaged SmolLM2 config) and
the transformers version, so a changed model or library is a new key, never a stale read.
Planning itself writes nothing (a parse of the Snakefile only reads). A stored file that
does not read back as shapes is ignored and the shapes are built again.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
from pathlib import Path
from typing import Any

from harness.adapters import TargetShape
from harness.common.files import atomic_write_json
from harness.model.load import (
    PACKAGED_MODEL_CONFIGS,
    _local_or_cached,
    adapted_layer_indices,
    cache_root,
    planning_model,
    target_shapes,
)

#: fields of the ``model`` section that cannot change a shape
_NOT_SHAPE = ("dtype", "device", "lower_layer_cache")


def _config_file(model_cfg: dict[str, Any]) -> Path | None:
    """The ``config.json`` :func:`harness.model.load.planning_model` reads (``None``: a tiny
    random model, whose config is the ``model.tiny`` section itself)."""
    if model_cfg.get("config_json"):
        return Path(model_cfg["config_json"])
    source = model_cfg["source"]
    if source == "tiny-random":
        return None
    if source == "smollm2":
        return PACKAGED_MODEL_CONFIGS / "smollm2-135m-instruct.json"
    return _local_or_cached(source) / "config.json"


def shapes_key(model_cfg: dict[str, Any]) -> str:
    """SHA-256 of the model section (less what cannot change a shape), its config file's
    bytes and the transformers version."""
    section = {k: v for k, v in model_cfg.items() if k not in _NOT_SHAPE}
    config_file = _config_file(model_cfg)
    parts = {
        "model": section,
        "config_json": hashlib.sha256(config_file.read_bytes()).hexdigest()
        if config_file is not None and config_file.is_file() else None,
        "transformers": importlib.metadata.version("transformers"),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _stored_path(config: dict[str, Any]) -> Path:
    return cache_root(config) / "shapes" / f"{shapes_key(config['model'])[:24]}.json"


def built_shapes(model_cfg: dict[str, Any]) -> list[TargetShape]:
    """The shapes from the model built on the ``meta`` device."""
    model = planning_model(model_cfg)
    layers = adapted_layer_indices(model, model_cfg["adapt_layers"])
    return target_shapes(model, model_cfg["target_modules"], layers)


def read_stored(config: dict[str, Any]) -> list[TargetShape] | None:
    """The stored shapes of this model, ``None`` when there are none (or unreadable ones)."""
    path = _stored_path(config)
    try:
        rows = json.loads(path.read_text())["shapes"]
        shapes = [TargetShape(str(n), int(i), int(o)) for n, i, o in rows]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return shapes or None


def study_shapes(config: dict[str, Any]) -> list[TargetShape]:
    """The adapted layers' shapes: stored by the data step, else built (nothing written)."""
    return read_stored(config) or built_shapes(config["model"])


def store_shapes(config: dict[str, Any]) -> Path:
    """Build the shapes and store them for every later plan (the data step calls this)."""
    path = _stored_path(config)
    shapes = built_shapes(config["model"])
    atomic_write_json(path, {"model": config["model"].get("source"),
                             "shapes": [[s.name, s.d_in, s.d_out] for s in shapes]})
    return path
