"""MoA's stage one: one peft LoRA per task (the toolkit's shared task-LoRA components), and
the checks that the folders given to a MoA model fit together.

A task adapter's folder name hashes only its own settings (model, data settings, training
settings, task, rank, alpha, seed, steps), never the list of other tasks, so dropping or
adding a task leaves every other adapter (and its folder) unchanged; another staged method
asking for the same task LoRAs gets the same folders.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from harness.adapters import ComponentError, ComponentInfo
from harness.adapters.task_loras import TASK_LORA_GROUP, task_lora, task_of

#: folder of the task adapters under the study's ``out_dir``
TASK_ADAPTER_DIR = TASK_LORA_GROUP

__all__ = ["TASK_ADAPTER_DIR", "check_compatible", "task_lora", "task_of"]


def _fields(info: ComponentInfo) -> dict[str, Any]:
    return {
        "task": task_of(info),
        "rank": info.adapter["config"]["rank"],
        "alpha": info.adapter["config"]["alpha"],
        "targets": list(info.adapter["targets"]),
        "model": info.effective.get("model"),
    }


def check_compatible(infos: Sequence[ComponentInfo]) -> None:
    """Refuse adapters that differ in base model, adapted modules, rank or alpha, or that
    share a task; the message names the folder and the field."""
    if not infos:
        raise ComponentError("no task-adapter folders given")
    first = _fields(infos[0])
    seen: dict[str, Any] = {}
    for info in infos:
        fields = _fields(info)
        for fld, what in (
            ("model", "base model spec"),
            ("targets", "adapted modules"),
            ("rank", "LoRA rank"),
            ("alpha", "LoRA alpha"),
        ):
            if fields[fld] != first[fld]:
                raise ComponentError(
                    f"{info.folder}: field {fld!r} ({what}) is {_short(fields[fld])}, but "
                    f"{infos[0].folder} has {_short(first[fld])}; every task adapter of a MoA "
                    "model needs the same base model, adapted modules, rank and alpha"
                )
        if fields["task"] in seen:
            raise ComponentError(
                f"{info.folder}: field 'task' is {fields['task']!r}, the same as "
                f"{seen[fields['task']]}; give one adapter per task"
            )
        seen[fields["task"]] = info.folder


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
