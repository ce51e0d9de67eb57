"""Parts of a run that separate jobs train first: what a staged method asks for, and what it
gets back.

A staged method (MoA: one LoRA per task, then a router over them) returns
:class:`Component` specs from ``Method.components(config, seed)``. The engine plans,
names, hashes and trains each like a run (method ``component.method`` with
``component.config``, on ``component.tasks``' items for ``component.steps`` steps), in
its own folder ``{out_dir}/{component.group}/{stem}-s{seed}-{hash}``, built by one
generic Snakemake rule. When the staged run is built, ``Method.load_components`` gets
:class:`ComponentInfo` objects for those folders, in the same order.

A component's hash covers the base model, the data settings (not the task selection),
the training settings (not the step count when the component sets its own), its
method, ``identity``, seed and steps; never the list of other components, so adding
or dropping one leaves every other folder name unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.adapters.errors import ComponentError


@dataclass(frozen=True)
class Component:
    """One part trained by its own job before the run that uses it.

    ``stem``: the readable start of its folder name (e.g. ``first-r4``); ``method`` and
    ``config``: the registered method that trains it and that method's config values;
    ``tag``: its variant tag in logs (e.g. ``r4``); ``tasks``: train only on these tasks'
    items (``None``: all); ``steps``: its optimizer steps (``None``: the study's);
    ``identity``: the values that say what it is, hashed into its name (e.g. ``{"stage":
    "...", "task": "first", "rank": 4, "alpha": 16}``); ``group``: its folder under
    ``out_dir``.
    """

    stem: str
    method: str
    config: dict[str, Any]
    tag: str
    tasks: tuple[str, ...] | None = None
    steps: int | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    group: str = "components"


@dataclass
class ComponentInfo:
    """A finished component folder: its ``run.json`` spec, its ``adapter/adapter.json`` and
    (loaded on demand) its weights."""

    folder: Path
    spec: dict[str, Any]
    adapter: dict[str, Any]

    @property
    def effective(self) -> dict[str, Any]:
        """What its name hashes (model, data, training settings, identity, seed, steps)."""
        return self.spec.get("effective_config") or {}

    def state_dict(self):
        from safetensors.torch import load_file

        return load_file(str(self.folder / "adapter" / "adapter.safetensors"))


def read_component(folder: str | Path) -> ComponentInfo:
    """Read a trained component folder, or raise :class:`ComponentError` naming what is missing
    (and the command that produces it)."""
    folder = Path(folder)
    spec_path = folder / "run.json"
    adapter_path = folder / "adapter" / "adapter.json"
    weights = folder / "adapter" / "adapter.safetensors"
    if not spec_path.exists():
        raise ComponentError(f"{folder}: not a component folder (run.json is missing)")
    if not adapter_path.exists() or not weights.exists():
        missing = "adapter/adapter.json" if not adapter_path.exists() else "adapter/adapter.safetensors"
        raise ComponentError(
            f"{folder}: not a trained component ({missing} is missing; weights are never "
            "committed): train it with `snakemake --cores N <that folder>/adapter/adapter.safetensors "
            "--configfile <config>`"
        )
    try:
        spec = json.loads(spec_path.read_text())
        adapter = json.loads(adapter_path.read_text())
    except ValueError as exc:
        raise ComponentError(f"{folder}: run.json or adapter/adapter.json is not valid JSON ({exc})") from None
    return ComponentInfo(folder, spec, adapter)
