"""What the composers over MoA's stage-one task LoRAs share (X-LoRA, Arrow): planning, budget
and loading. See docs/composition.md for the study that compares them.

Stage one is MoA's, unchanged: one peft LoRA of rank ``r = R/T`` per task ``t = 1..T`` of the
training data, trained on that task's items only, for ``ceil(train.steps / n_tasks)`` steps
(the toolkit's shared task-LoRA components, :func:`harness.adapters.task_loras.task_lora`).
Every composer of a study asks for the same components (same task, rank, alpha and steps), so
the engine trains each task LoRA once and MoA, LoRAHub, X-LoRA and Arrow compose the very
same folders. The ``T`` LoRAs are loaded as the rank blocks of one block mixture and frozen
(:func:`harness.adapters.task_loras.load_task_loras`); only the composer differs.

Budget (per adapted module, as MoA's): ``r = R/T`` must be whole (else ``BudgetError``), the
task LoRAs are the total (``T·r·(d_in + d_out)``, the same as LoRA rank ``R``), and each
composer adds its own stage-two parameters, listed as router parameters.

Options every composer takes: ``tasks`` (default: every task of the training data, in block
order) and ``task_steps`` (default ``ceil(train.steps / n_tasks)``, MoA's rule: the task LoRAs
of every composer are the same folders only if this is the same).

Outside a study (no task list: a lone layer under a test), the composer is solved at each
granularity ``G`` of the request as ``T = G`` anonymous blocks with no stage one.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from harness.adapters import (
    BlockMixtureMethod,
    BudgetError,
    ComponentError,
    MixtureConfig,
    OptionError,
    TargetShape,
    Variant,
)
from harness.adapters.task_loras import load_task_loras, task_lora, task_of


@dataclass
class ComposerConfig(MixtureConfig):
    """``num_experts = T`` task LoRAs of rank ``expert_rank = r``; ``top_k`` active (``None``: all)."""

    tasks: list[str] | None = None
    task_steps: int | None = None


def residual_width(shapes: Sequence[TargetShape]) -> int:
    """The width of the residual stream the adapted modules read and write: the most common
    of their ``d_in`` and ``d_out`` (q/k/v/gate/up read it, o/down write it); ties go to the
    smaller. A model whose config says otherwise is refused when the adapter is built."""
    if not shapes:
        raise BudgetError("no adapted modules: the residual width is unknown")
    counts = Counter(v for s in shapes for v in (s.d_in, s.d_out))
    return min(counts, key=lambda v: (-counts[v], v))


class TaskLoraComposer(BlockMixtureMethod):
    """A stage-two composer over the study's task LoRAs (``T`` blocks of rank ``R/T``).
    Subclasses set the layer and say how ``top_k`` is chosen (:meth:`default_top_k`)."""

    config_cls = ComposerConfig
    sweeps_granularity = False

    # -- planning ----------------------------------------------------------------------
    def prepare_options(self, options, context) -> dict[str, Any]:
        opts = dict(options or {})
        available = list(context.tasks or [])
        tasks = opts.get("tasks")
        if tasks is None:
            if not available:
                raise OptionError(
                    f"{self.name} composes one LoRA per task: it needs the task names of the "
                    "training data, which this data source does not give before it is read: "
                    "set data.tasks, or the method's `tasks` option"
                )
            tasks = available
        if isinstance(tasks, str) or not isinstance(tasks, list) or not tasks:
            raise OptionError(f"{self.name} option tasks = {tasks!r}; expected a non-empty list of task names")
        unknown = [t for t in tasks if available and t not in available]
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if unknown or dup:
            raise OptionError(
                f"{self.name} option tasks = {tasks!r}: "
                + (f"{unknown} not in the training data" if unknown else f"{dup} listed twice")
                + f"; tasks of the training data: {available}"
            )
        opts["tasks"] = list(tasks)
        if context.steps and opts.get("task_steps") is None:
            # MoA's rule: the same task-LoRA folders for every composer of the study
            opts["task_steps"] = math.ceil(context.steps / len(available or tasks))
        return opts

    def variants(self, request, options=None) -> list[Variant]:
        tasks = (options or {}).get("tasks")
        if tasks:
            return [Variant(len(tasks), f"T{len(tasks)}")]
        # no task list: a lone layer outside a study (T = G anonymous blocks, no stage one)
        return [Variant(g, f"T{g}") for g in request.granularities]

    def task_rank(self, request, T: int, tasks: Sequence[str] | None) -> int:
        """``r = R / T``, or :class:`BudgetError` saying which total ranks fit."""
        R = request.total_rank
        if R % T:
            near = [v for v in (T * (R // T), T * (R // T + 1)) if v >= T]
            raise BudgetError(
                f"{self.name} composes one LoRA per task: per-task rank = total_rank/T = {R}/{T} = "
                f"{R / T:.3g} is not a whole number (T = {T} tasks"
                + (f": {', '.join(tasks)}" if tasks else "")
                + f"); feasible total ranks for T={T}: multiples of {T}; nearest: {near}"
            )
        return R // T

    def check_top_k(self, top_k: Any, T: int) -> None:
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= T):
            raise OptionError(f"{self.name} option top_k = {top_k!r}; valid: 1 to the {T} task LoRAs, or null (all)")

    def default_top_k(self, request, r: int, T: int) -> int | None:
        """``top_k`` when the option is not given (``None``: every task LoRA, dense)."""
        return None

    def solve_composer(self, request, variant, shapes, options, **derived) -> ComposerConfig:
        """The config at the study's budget: ``T`` task LoRAs of rank ``R/T``, the ``top_k``
        option (or :meth:`default_top_k`), plus ``derived`` values."""
        options = dict(options or {})
        tasks = options.get("tasks")
        T = len(tasks) if tasks else variant.granularity
        r = self.task_rank(request, T, tasks)
        top_k = options.pop("top_k", None)
        if top_k is None:
            top_k = self.default_top_k(request, r, T)
        self.check_top_k(top_k, T)
        return self.configure(
            options, alpha=request.alpha, num_experts=T, expert_rank=r, top_k=top_k, **derived
        )

    def is_dense(self, config: ComposerConfig) -> bool:
        return config.top_k is None or config.top_k >= config.num_experts

    def components(self, config: ComposerConfig, seed: int):
        return [task_lora(t, config.expert_rank, config.alpha, config.task_steps) for t in config.tasks or []]

    # -- loading -----------------------------------------------------------------------
    def load_components(self, handle, components) -> None:
        """Stack the stage-one LoRAs (one folder per task, in ``config.tasks`` order) into the
        rank blocks of every layer and freeze them (each folder's task, rank, alpha and
        adapted modules are checked, naming the folder and field)."""
        config: ComposerConfig = handle.config
        tasks = list(config.tasks or [])
        if len(components) != len(tasks):
            raise ComponentError(
                f"{self.name} over the tasks {tasks} got {len(components)} task-adapter folders"
            )
        if components:
            load_task_loras(handle, list(components), tasks)

    def compose_values(self, components: Sequence, options: dict[str, Any]) -> dict[str, Any]:
        """The config values of a composer over existing task-adapter folders (in block
        order): their rank, alpha, tasks and steps, and ``options``."""
        if not components:
            raise ComponentError("no task-adapter folders given")
        first = components[0]
        tasks = [task_of(c) for c in components]
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if dup:
            raise ComponentError(f"task-adapter folders for the same task {dup}: give one per task")
        for c in components[1:]:
            for fld in ("rank", "alpha"):
                if c.adapter["config"][fld] != first.adapter["config"][fld]:
                    raise ComponentError(
                        f"{c.folder}: field {fld!r} is {c.adapter['config'][fld]!r}, but "
                        f"{first.folder} has {first.adapter['config'][fld]!r}"
                    )
        opts = dict(options)
        top_k = opts.pop("top_k", None)
        self.check_top_k(top_k, len(components))
        return dict(
            alpha=first.adapter["config"]["alpha"],
            num_experts=len(components),
            expert_rank=first.adapter["config"]["rank"],
            top_k=top_k,
            tasks=tasks,
            task_steps=first.effective.get("steps"),
            **opts,
        )

    # -- training ----------------------------------------------------------------------
    def training_tasks(self, config: ComposerConfig) -> list[str] | None:
        return list(config.tasks) if config.tasks else None

    def describe(self, config: ComposerConfig) -> dict[str, Any]:
        return {
            "num_experts": config.num_experts,
            "expert_rank": config.expert_rank,
            "top_k": config.top_k if config.top_k is not None else config.num_experts,
        }


def component_shapes(component) -> list[TargetShape]:
    """The adapted modules' shapes, read from a task-LoRA folder's weights (``A``: ``r x d_in``,
    ``B``: ``d_out x r``)."""
    state = component.state_dict()
    out = []
    for name in component.adapter["targets"]:
        a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
        out.append(TargetShape(name, int(a.shape[1]), int(b.shape[0])))
    return out


__all__ = ["ComposerConfig", "TaskLoraComposer", "component_shapes", "residual_width"]
