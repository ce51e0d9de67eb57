"""From a validated config to the list of runs: budget rows x seeds, each with its folder name.

A run's folder name carries the method, its variant (granularity ``G8``, or
``r16`` for a LoRA reference of rank 16), the seed and a short hash of the
run's *effective* config (everything that can change its numbers), so a changed
setting never lands in an old folder.
"""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from harness.budget import BudgetRequest, BudgetRow, solve_study
from harness.config import method_entries
from harness.methods import get_method, load_plugin
from harness.methods.base import TargetShape

#: settings that change where or how fast things run, not what is computed (device and
#: thread count can still move the last bits of floating-point results)
_EXECUTION_ONLY = {
    "model": ("config_json", "device", "lower_layer_cache"),
    "train": ("seeds", "checkpoint_every", "threads"),
    "eval": ("include_base", "batch_size"),
}

PACKAGED_MODEL_CONFIGS = Path(__file__).with_name("model_configs")


def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass
class Run:
    run_id: str
    method: str
    tag: str
    granularity: int
    seed: int
    method_config: dict[str, Any]
    effective: dict[str, Any]
    row: BudgetRow | None = None
    #: folders (relative to out_dir) of parts trained by earlier jobs, e.g. MoA's task LoRAs
    components: list[str] = field(default_factory=list)

    @property
    def is_base(self) -> bool:
        return self.method == "base"


@dataclass
class StudyPlan:
    config: dict[str, Any]
    shapes: list[TargetShape]
    rows: list[BudgetRow]
    runs: list[Run] = field(default_factory=list)
    #: stage-one jobs of two-stage methods (MoA's per-task LoRAs), each once
    task_adapters: list[Any] = field(default_factory=list)

    @cached_property
    def by_id(self) -> dict[str, Run]:
        return {r.run_id: r for r in self.runs}

    def run(self, run_id: str) -> Run:
        try:
            return self.by_id[run_id]
        except KeyError:
            known = ", ".join(sorted(self.by_id)[:8])
            raise KeyError(
                f"run {run_id!r} is not part of study {self.config['study']!r} as configured; "
                f"known runs include: {known}"
            ) from None

    @property
    def out_dir(self) -> Path:
        return Path(self.config["out_dir"])

    def run_dir(self, run: Run | str) -> Path:
        run_id = run if isinstance(run, str) else run.run_id
        return self.out_dir / "runs" / run_id

    @property
    def trained_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.is_base]

    def task_adapter(self, name: str):
        for adapter in self.task_adapters:
            if adapter.name == name:
                return adapter
        known = ", ".join(a.name for a in self.task_adapters[:8]) or "none"
        raise KeyError(
            f"task adapter {name!r} is not part of study {self.config['study']!r} as "
            f"configured; known task adapters include: {known}"
        )


def _strip(section: dict[str, Any], name: str) -> dict[str, Any]:
    out = copy.deepcopy(section)
    for key in _EXECUTION_ONLY.get(name, ()):
        out.pop(key, None)
    return out


def _drop_unset(value: Any) -> Any:
    """Leave out settings that are ``None`` (unset), so that adding a new optional setting
    to the schema does not rename every existing run folder."""
    if isinstance(value, dict):
        return {k: _drop_unset(v) for k, v in value.items() if v is not None}
    return value


def effective_common(config: dict[str, Any]) -> dict[str, Any]:
    return _drop_unset(
        {
            "model": _strip(config["model"], "model"),
            "data": config["data"],
            "train": _strip(config["train"], "train"),
            "eval": _strip(config["eval"], "eval"),
        }
    )


# -- shapes from a config alone ------------------------------------------------------------


def planning_model(model_cfg: dict[str, Any]):
    """The base model built on the ``meta`` device from its config alone (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from harness.modeling import TINY_DEFAULTS, ModelSourceError

    source = model_cfg["source"]
    if model_cfg.get("config_json"):
        path = Path(model_cfg["config_json"])
        if not path.exists():
            raise ModelSourceError(f"model.config_json {str(path)!r} does not exist")
        config = AutoConfig.from_pretrained(str(path))
    elif source == "tiny-random":
        spec = {**TINY_DEFAULTS, **(model_cfg.get("tiny") or {})}
        config = LlamaConfig(
            vocab_size=spec["vocab_size"],
            hidden_size=spec["hidden_size"],
            intermediate_size=spec["intermediate_size"],
            num_hidden_layers=spec["num_hidden_layers"],
            num_attention_heads=spec["num_attention_heads"],
            num_key_value_heads=spec["num_key_value_heads"],
            tie_word_embeddings=True,
        )
    elif source == "smollm2":
        config = AutoConfig.from_pretrained(str(PACKAGED_MODEL_CONFIGS / "smollm2-135m-instruct.json"))
    else:
        from harness.modeling import _local_or_cached

        config = AutoConfig.from_pretrained(str(_local_or_cached(source)))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def study_shapes(config: dict[str, Any]) -> list[TargetShape]:
    from harness.modeling import adapted_layer_indices, target_shapes

    model = planning_model(config["model"])
    layers = adapted_layer_indices(model, config["model"]["adapt_layers"])
    return target_shapes(model, config["model"]["target_modules"], layers)


# -- the plan ------------------------------------------------------------------------------


def load_methods(config: dict[str, Any]):
    for path in config.get("plugins", []):
        load_plugin(path)
    out = []
    for name, options in method_entries(config):
        method = get_method(name)
        out.append((method, method.study_options(config, options)))
    return out


def plan_study(config: dict[str, Any], shapes: list[TargetShape] | None = None) -> StudyPlan:
    """Solve the budget and expand seeds; infeasible budgets and unknown methods fail here."""
    methods = load_methods(config)
    shapes = shapes if shapes is not None else study_shapes(config)
    request = BudgetRequest.from_config(config["budget"])
    rows = solve_study(request, methods, shapes)
    plan = StudyPlan(config=config, shapes=shapes, rows=rows)
    common = effective_common(config)
    for row in rows:
        for seed in config["train"]["seeds"]:
            effective = {
                **common,
                "method": row.method,
                "variant": row.variant.tag,
                "method_config": row.config.to_dict(),
                "seed": seed,
            }
            components = get_method(row.method).components(config, row.config, seed)
            if components:
                effective["components"] = [c.path for c in components]
                known = {a.path for a in plan.task_adapters}
                plan.task_adapters += [c for c in components if c.path not in known]
            run_id = f"{row.method}-{row.variant.tag}-s{seed}-{short_hash(effective)}"
            plan.runs.append(
                Run(run_id, row.method, row.variant.tag, row.variant.granularity, seed,
                    row.config.to_dict(), effective, row, [c.path for c in components])
            )
    if config["eval"]["include_base"]:
        effective = {"model": common["model"], "data": common["data"], "eval": common["eval"],
                     "method": "base"}
        run_id = f"base-G0-s0-{short_hash(effective)}"
        plan.runs.append(Run(run_id, "base", "G0", 0, 0, {}, effective))
    return plan
