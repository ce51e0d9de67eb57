"""Task LoRAs: the component "a peft LoRA trained on one task's items only" that staged
methods build on (one per task), and loading them as the rank blocks of a block mixture."""

from __future__ import annotations

import json
from typing import Any

import torch

from harness.adapters.components import Component, ComponentInfo
from harness.adapters.errors import ComponentError
from harness.adapters.registry import reference_method

#: folder of task LoRAs under a study's ``out_dir``
TASK_LORA_GROUP = "task_adapters"


def task_lora(task: str, rank: int, alpha: float, steps: int | None) -> Component:
    """The component "a peft LoRA of ``rank`` trained on ``task``'s items only", shared by
    every staged method that builds on task LoRAs: two methods (or two runs) asking for the
    same task, rank, alpha and steps get the same folder, trained once."""
    return Component(
        stem=f"{task}-r{rank}",
        method=reference_method().name,  # peft's LoRA
        config={"alpha": alpha, "rank": rank},
        tag=f"r{rank}",
        tasks=(task,),
        steps=steps,
        identity={"stage": "task adapter", "task": task, "rank": rank, "alpha": alpha},
        group=TASK_LORA_GROUP,
    )


def task_of(info: ComponentInfo) -> str:
    """The task a task-LoRA folder was trained on (from its ``run.json``)."""
    reference = reference_method().name
    if info.adapter.get("method") != reference:
        raise ComponentError(
            f"{info.folder}: field 'method' is {info.adapter.get('method')!r}; a task adapter is "
            f"a peft LoRA ({reference!r})"
        )
    task = info.effective.get("task")
    if not task:
        raise ComponentError(
            f"{info.folder}: field 'task' is missing from run.json's effective_config; a task "
            "adapter is trained on one task's items"
        )
    return task


def load_task_loras(handle, infos: list[ComponentInfo], tasks: list[str]) -> None:
    """Copy each task's peft LoRA (``A_t``, ``B_t``) into rank block ``t`` of every adapted
    block-mixture layer (``lora_A``/``lora_B`` of rank ``expert_rank`` per block) and freeze
    the stacked matrices (they still count as adapter parameters). A folder whose task,
    rank, alpha or adapted modules do not fit is refused, naming the folder and field."""
    config = handle.config
    targets = [t.name for t in handle.targets]
    r = config.expert_rank
    for e, (info, task) in enumerate(zip(infos, tasks)):
        have = {
            "task": task_of(info),
            "rank": info.adapter["config"]["rank"],
            "alpha": info.adapter["config"]["alpha"],
            "targets": list(info.adapter["targets"]),
        }
        for fld, want in (("task", task), ("rank", r), ("alpha", config.alpha), ("targets", targets)):
            if have[fld] != want:
                raise ComponentError(
                    f"{info.folder}: field {fld!r} is {_short(have[fld])}, but this model's "
                    f"block {e} needs {_short(want)}"
                )
        state = info.state_dict()
        with torch.no_grad():
            for name in targets:
                layer = handle.model.get_submodule(name)
                layer.lora_A[e * r : (e + 1) * r].copy_(state[f"{name}.lora_A.default.weight"])
                layer.lora_B[:, e * r : (e + 1) * r].copy_(state[f"{name}.lora_B.default.weight"])
    layers = [handle.model.get_submodule(name) for name in targets]
    handle.add_frozen([p for layer in layers for p in (layer.lora_A, layer.lora_B)])


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."
