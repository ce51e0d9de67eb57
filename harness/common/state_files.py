"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A checkpoint folder is read back when a killed run resumes, and a results folder is shared and
downloaded: reading it must never execute anything. ``torch.save`` pickles, and unpickling runs
whatever the file says; so :func:`save_state` writes a nested state (dicts, lists, tuples,
numbers, strings, ``None``, tensors, NumPy arrays) as two files:

    state.json           the structure, with each tensor replaced by a reference
    tensors.safetensors  the tensors, by reference name (safetensors: a JSON header and raw bytes)

:func:`load_state` rebuilds exactly what was saved: the same container types (a tuple stays a
tuple, integer dict keys stay integers), the same floats (JSON round-trips a Python float
exactly, NaN and infinities included), the same tensors bit for bit (dtype and shape kept).
Neither file can hold code, and a file that is not what it should be (a pickle put in its place,
a truncated or edited file) is refused with an error naming it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_JSON = "state.json"
TENSORS = "tensors.safetensors"
FORMAT = "harness-state/1"


class StateFileError(ValueError):
    """A state folder that cannot be read as saved (wrong format, damaged, edited)."""


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}:{path}"
        # a private, contiguous CPU copy: safetensors refuses shared or strided storage
        tensors[name] = value.detach().to("cpu", copy=True).contiguous()
        return {"tensor": name}
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return _encode(value.item(), path, tensors)
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        items = []
        for k, v in value.items():
            if not isinstance(k, (str, int)) or isinstance(k, bool):
                raise TypeError(f"state key {path}.{k!r}: only str and int keys can be saved, not {type(k).__name__}")
            items.append([k, _encode(v, f"{path}.{k}", tensors)])
        return {"dict": items}
    raise TypeError(
        f"state value at {path or 'the top'} is a {type(value).__name__}; a state file holds only "
        "dicts, lists, tuples, numbers, strings, None, tensors and NumPy arrays"
    )


def _decode(node: Any, tensors: dict[str, torch.Tensor], where: Path) -> Any:
    if node is None or isinstance(node, (bool, int, float, str)):
        return node
    if isinstance(node, list):
        return [_decode(v, tensors, where) for v in node]
    if isinstance(node, dict) and len(node) == 1:
        (kind, body), = node.items()
        if kind == "tensor" and isinstance(body, str):
            if body not in tensors:
                raise StateFileError(f"{where}: refers to tensor {body!r}, which {where.parent / TENSORS} does not hold")
            return tensors[body]
        if kind == "tuple" and isinstance(body, list):
            return tuple(_decode(v, tensors, where) for v in body)
        if kind == "dict" and isinstance(body, list):
            out = {}
            for pair in body:
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))):
                    raise StateFileError(f"{where}: a dict entry is not a [key, value] pair: {str(pair)[:80]}")
                out[pair[0]] = _decode(pair[1], tensors, where)
            return out
    if isinstance(node, dict) and set(node) == {"ndarray", "dtype", "shape"}:
        try:
            return np.array(node["ndarray"], dtype=np.dtype(node["dtype"])).reshape(node["shape"])
        except (TypeError, ValueError) as exc:
            raise StateFileError(f"{where}: an array entry cannot be rebuilt: {exc}") from None
    raise StateFileError(f"{where}: unexpected entry {str(node)[:80]} (not written by harness.common.state_files)")


def save_state(directory: str | Path, state: dict[str, Any]) -> None:
    """Write ``state`` into ``directory`` (created) as ``state.json`` + ``tensors.safetensors``.
    Raises TypeError naming the key of a value that cannot be saved without pickle."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    body = _encode(state, "", tensors)
    save_file(tensors, str(directory / TENSORS))
    (directory / STATE_JSON).write_text(json.dumps({"format": FORMAT, "state": body}) + "\n", encoding="utf-8")


def load_state(directory: str | Path) -> dict[str, Any]:
    """The state :func:`save_state` wrote into ``directory``, tensors on the CPU. Nothing in
    either file is executed; a missing, damaged or foreign file raises :class:`StateFileError`
    naming it."""
    directory = Path(directory)
    meta_path, tensor_path = directory / STATE_JSON, directory / TENSORS
    for path in (meta_path, tensor_path):
        if not path.is_file():
            raise StateFileError(f"{path} is missing: {directory} is not a complete state folder")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{meta_path} is not a JSON state file ({exc}); it was not written by the harness") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "state" not in meta:
        raise StateFileError(f"{meta_path}: not a {FORMAT!r} state file (format {str(meta.get('format') if isinstance(meta, dict) else meta)[:40]!r})")
    try:
        tensors = load_file(str(tensor_path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateFileError(f"{tensor_path} is not a safetensors file ({exc}); it was not written by the harness") from None
    return _decode(meta["state"], tensors, meta_path)
