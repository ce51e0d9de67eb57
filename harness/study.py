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

from harness.adapters import Component, PlanContext, TargetShape, get_method, load_plugin
from harness.budget import BudgetRequest, BudgetRow, solve_study
from harness.config import load_config, method_entries
from harness.data.tasks import content_digest, task_digests, training_items

#: settings that change where or how fast things run, not what is computed (device and
#: thread count can still move the last bits of floating-point results)
_EXECUTION_ONLY = {
    "model": ("config_json", "device", "lower_layer_cache"),
    "train": ("seeds", "checkpoint_every", "threads"),
    "eval": ("include_base", "batch_size"),
}

def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


RUNS_DIR = "runs"


@dataclass
class Run:
    """One training job: a run of the study (``runs/<run id>``, evaluated) or a component a
    staged run is built on (``<group>/<name>``, e.g. ``task_adapters/first-r4-s0-59304226``).

    ``components``: folders (relative to ``out_dir``) of the parts this run loads, in the
    method's order; ``tasks``/``steps``: a component's own training items and step count
    (``None``: the method's choice, else the study's).
    """

    run_id: str
    method: str
    tag: str
    granularity: int
    seed: int
    method_config: dict[str, Any]
    effective: dict[str, Any]
    row: BudgetRow | None = None
    components: list[str] = field(default_factory=list)
    tasks: list[str] | None = None
    steps: int | None = None
    group: str = RUNS_DIR

    @property
    def is_base(self) -> bool:
        return self.method == "base"

    @property
    def is_component(self) -> bool:
        return self.group != RUNS_DIR

    @property
    def path(self) -> str:
        """The run's folder, relative to ``out_dir``."""
        return f"{self.group}/{self.run_id}"


@dataclass
class StudyPlan:
    config: dict[str, Any]
    shapes: list[TargetShape]
    rows: list[BudgetRow]
    runs: list[Run] = field(default_factory=list)
    #: parts trained by their own jobs before the runs that load them, each once
    components: list[Run] = field(default_factory=list)

    @cached_property
    def by_id(self) -> dict[str, Run]:
        return {r.run_id: r for r in [*self.runs, *self.components]}

    def run(self, run_id: str) -> Run:
        """A run or component of the plan by id (folder name); a near miss is named."""
        try:
            return self.by_id[run_id]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(run_id, list(self.by_id), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(
                f"run {run_id!r} is not part of study {self.config['study']!r} as configured"
                f"{hint} List them with `python -m harness plan --config <config>`"
                + (" (--components for the components)" if self.components else "")
            ) from None

    @property
    def out_dir(self) -> Path:
        return Path(self.config["out_dir"])

    def run_dir(self, run: Run | str) -> Path:
        run = self.run(run) if isinstance(run, str) else run
        return self.out_dir / run.path

    @property
    def trained_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.is_base]

    @property
    def training_jobs(self) -> list[Run]:
        """Everything that trains: the components first, then the trained runs."""
        return [*self.components, *self.trained_runs]


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


def study_shapes(config: dict[str, Any]) -> list[TargetShape]:
    """The adapted layers' shapes, from the model built on the ``meta`` device (no weights)."""
    from harness.modeling import adapted_layer_indices, planning_model, target_shapes

    model = planning_model(config["model"])
    layers = adapted_layer_indices(model, config["model"]["adapt_layers"])
    return target_shapes(model, config["model"]["target_modules"], layers)


# -- the plan ------------------------------------------------------------------------------


def plan_context(config: dict[str, Any]) -> PlanContext:
    """What a method may know when its options are completed: the training data's task
    names and the configured step count."""
    from harness.data.tasks import training_task_names

    return PlanContext(tasks=training_task_names(config["data"]) or None, steps=config["train"].get("steps"))


def load_methods(config: dict[str, Any]):
    """``[(method, options), ...]`` in config order: plugins loaded, options completed."""
    for path in config.get("plugins", []):
        load_plugin(path)
    context = plan_context(config)
    out = []
    for name, options in method_entries(config):
        method = get_method(name)
        out.append((method, method.prepare_options(options, context)))
    return out


def component_run(
    config: dict[str, Any], component: Component, seed: int, digests: dict[str, str] | None = None
) -> Run:
    """The job that trains ``component`` for ``seed``: its folder name hashes the base model,
    the data settings (not the task selection) and the content of the training items it
    reads (its own tasks' only), the training settings (not the step count when the
    component sets its own), its method, identity, seed and steps."""
    common = effective_common(config)
    train = dict(common["train"])
    if component.steps is not None:
        train.pop("steps", None)  # replaced by the component's own step count
    data = {k: v for k, v in common["data"].items() if k != "tasks"}
    if digests is not None:
        data["train_content"] = content_digest(digests, component.tasks)
    effective = _drop_unset(
        {
            "model": common["model"],
            "data": data,
            "train": train,
            "method": component.method,
            **component.identity,
            "seed": seed,
            "steps": component.steps,
        }
    )
    name = f"{component.stem}-s{seed}-{short_hash(effective)}"
    return Run(
        name,
        component.method,
        component.tag,
        1,
        seed,
        dict(component.config),
        effective,
        tasks=list(component.tasks) if component.tasks is not None else None,
        steps=component.steps,
        group=component.group,
    )


def training_digests(config: dict[str, Any]) -> dict[str, str] | None:
    """Per task, a digest of its training items (``None`` for lm-eval sources, whose items
    are known only after the data step: their config is hashed instead)."""
    if config["data"]["source"] == "lm_eval":
        return None
    return task_digests(training_items(config["data"]))


def plan_study(config: dict[str, Any], shapes: list[TargetShape] | None = None) -> StudyPlan:
    """Solve the budget and expand seeds; infeasible budgets and unknown methods fail here."""
    methods = load_methods(config)
    shapes = shapes if shapes is not None else study_shapes(config)
    request = BudgetRequest.from_config(config["budget"])
    rows = solve_study(request, methods, shapes)
    plan = StudyPlan(config=config, shapes=shapes, rows=rows)
    digests = training_digests(config)
    common = effective_common(config)
    if digests is not None:  # what the runs read, not only where it comes from
        common["data"] = {**common["data"], "train_content": content_digest(digests)}
    known: set[str] = set()
    for row in rows:
        for seed in config["train"]["seeds"]:
            effective = {
                **common,
                "method": row.method,
                "variant": row.variant.tag,
                "method_config": row.config.to_dict(),
                "seed": seed,
            }
            parts = [
                component_run(config, c, seed, digests)
                for c in get_method(row.method).components(row.config, seed)
            ]
            if parts:
                effective["components"] = [p.path for p in parts]
                plan.components += [p for p in parts if p.path not in known]
                known.update(p.path for p in parts)
            run_id = f"{row.method}-{row.variant.tag}-s{seed}-{short_hash(effective)}"
            plan.runs.append(
                Run(run_id, row.method, row.variant.tag, row.variant.granularity, seed,
                    row.config.to_dict(), effective, row, [p.path for p in parts])
            )
    if config["eval"]["include_base"]:
        effective = {"model": common["model"], "data": common["data"], "eval": common["eval"],
                     "method": "base"}
        run_id = f"base-G0-s0-{short_hash(effective)}"
        plan.runs.append(Run(run_id, "base", "G0", 0, 0, {}, effective))
    return plan


def plan_from_file(config_path: str | Path) -> tuple[dict[str, Any], StudyPlan]:
    """``(validated config, plan)`` of a study config file."""
    config = load_config(config_path)
    return config, plan_study(config)
