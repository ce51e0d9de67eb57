"""MoA — Mixture-of-LoRAs, Feng et al. 2024, "Mixture-of-LoRAs: An Efficient Multitask
Tuning for Large Language Models", arXiv 2403.03432.

Two training stages:

1. **Task adapters.** One peft LoRA of rank ``r`` per task ``t = 1..T`` of the training
   mixture, each trained only on its own task's items (``A_t``: ``r x d_in``,
   ``B_t``: ``d_out x r``), so heterogeneous tasks cannot interfere while they train.
   Each is a *component* (:class:`~harness.adapters.components.Component`): the engine
   trains it in its own job (Snakemake's generic ``train_component`` rule), in
   ``{out_dir}/task_adapters/{task}-r{r}-s{seed}-{hash8}/``.
2. **Router.** The ``T`` LoRAs are stacked as rank blocks of one block-gated layer
   (:class:`~harness.adapters.mixture.BlockMixtureLayer`), frozen, and only a router
   per adapted module trains, on the whole mixture::

       delta(x) = sum_{t in topk(W_g pool(x))} g_t · (alpha / r) · B_t A_t x

   ``g``: softmax over the ``k`` selected logits, so with ``k = 1`` the chosen adapter
   acts at full strength, exactly as that task's LoRA alone (the paper selects one
   LoRA per input). The router then learns from the task-label loss only, which
   therefore must be on (``router_supervision > 0``) when ``k = 1``. (Weighting the
   chosen adapter by its full-softmax probability, Switch-style, was tried first: the
   task loss then rewards whichever adapter is already chosen, the router stayed at
   chance on the default study, and an unsure router scaled the adapter down to ~1/T.)

Budget (per adapted module, the same accounting as every routed method)::

    r = R / T,   k = K / r            (both must be whole numbers, else BudgetError)
    total     = T · r · (d_in + d_out) + T · d_in      (all task adapters + router)
    activated = k · r · (d_in + d_out) + T · d_in      (the adapters a token uses + router)
    router    = T · d_in

so with ``router: separate`` the total equals LoRA rank ``R``'s and the activated count
LoRA rank ``K``'s exactly. "Trainable" means across both stages: the stacked task
LoRAs are trained in stage one and frozen in stage two, and they are counted in
``total`` (the layer holds them as parameters; the budget check and ``apply_method``'s
count check see them all). The variant tag is ``T{T}`` and the
granularity ``T``, so MoA lands in the granularity figure at ``x = T``.

Where the paper is silent, or where this implementation deviates (all configurable):

* **One router per adapted module** (``T x d_in``, no bias, normal(0, 0.02)), reading
  that module's input, like the other routed methods here, rather than one router
  for the whole model; this keeps ``router: separate|counted`` accounting unchanged.
* ``level: sequence`` (default): one choice per sequence, scored from the mean of the
  module's input over the sequence's prompt tokens (real tokens up to the first
  trained answer position; at evaluation, every real token of the scored sequence).
  The answer tokens never steer the routing in training, so training and lm-eval's
  scoring route on the same prompt. ``level: token``: every token routes itself.
* ``router_supervision`` (default 1.0): weight of a cross-entropy loss between the
  router logits and the item's task index, as the paper's domain-label loss; at
  sequence level on the pooled logits, at token level on every real token. It is
  averaged over the adapted modules (each module's term is divided by their number),
  delivered through the auxiliary-loss hook; the labels reach the layers through
  ``AdapterHandle.task_labels`` because the method sets ``needs_task_labels``.
* ``task_steps`` (default ``ceil(train.steps / n_tasks)``, ``n_tasks`` the number of
  tasks in the study's training data): each task adapter gets the share of optimizer
  steps its task gets in one joint run, so the stage-one total equals one joint run's
  steps when every task has an adapter. The default does not depend on the ``tasks``
  option, so dropping a task from that option leaves every other task adapter (and its
  folder name) unchanged. With ``train.epochs`` instead of steps: the epochs over the
  task's own items.
* ``router_steps`` (default ``ceil(train.steps / T)``; with epochs, a ``1/T`` share of
  the joint run's steps): stage two's optimizer steps, same lr, schedule and batch.
* ``tasks`` (default: every task of the training data): the tasks that get an adapter,
  in router order; the router trains on those tasks' items only.
* Same seed for every task adapter of a run (initialisation and batch order, as for
  any run of that seed); learning rate, schedule, batch size and alpha are the study's.
* Every test item's task must have an adapter for its router accuracy to count;
  items of other tasks are left out of ``router_accuracy`` (they are still scored).
* Generation (``generate_until``) with a KV cache routes each new token on its own at
  sequence level; the suite's log-likelihood scoring is unaffected.

``python -m harness compose --method moa --components DIR...`` builds a MoA run from any
compatible task-adapter folders (stage two only, :meth:`MoA.compose_config`), so an
adapter can be dropped or a newly trained one added.

Evaluation: the router's accuracy at picking the item's task adapter
(``router_accuracy``, per task and overall) is read from the evaluation's routing record
(:meth:`MoA.evaluation_metrics`): at sequence level each scored sequence picks one
adapter, so the share of a task's sequences routed to its own adapter, averaged over the
adapted modules, is that task's router accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from harness.adapters import (
    BlockMixtureMethod,
    BudgetError,
    ComponentError,
    Metric,
    MixtureConfig,
    OptionError,
    Variant,
    register,
)
from harness.adapters.grid import fit_router_counted, nearest
from harness.adapters.task_loras import load_task_loras, task_lora, task_of
from methods.moa.layer import LEVELS, MoALayer
from methods.moa.task_adapters import check_compatible

__all__ = ["LEVELS", "MoA", "MoAConfig", "MoALayer"]


@dataclass
class MoAConfig(MixtureConfig):
    """``num_experts = T`` task adapters of rank ``expert_rank = r``, ``top_k = k`` active."""

    tasks: list[str] | None = None
    level: str = "sequence"
    router_supervision: float = 1.0
    task_steps: int | None = None
    router_steps: int | None = None
    router_lr: float | None = 0.01

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise OptionError(f"moa option level = {self.level!r}; valid: {', '.join(LEVELS)}")
        if not self.router_supervision >= 0:
            raise OptionError(
                f"moa option router_supervision = {self.router_supervision!r}; valid: >= 0"
            )
        if self.router_lr is not None and not self.router_lr > 0:
            raise OptionError(f"moa option router_lr = {self.router_lr!r}; valid: > 0, or null for train.lr")
        for name in ("task_steps", "router_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise OptionError(f"moa option {name} = {value!r}; valid: a positive integer")


@register
class MoA(BlockMixtureMethod):
    name = "moa"
    display_name = "MoA"
    description = (
        "one peft LoRA per task trained separately (stage one), frozen and combined by a "
        "trained router (stage two)"
    )
    paper = "Feng et al. 2024, arXiv 2403.03432"
    config_cls = MoAConfig
    layer_cls = MoALayer
    sweeps_granularity = False
    needs_task_labels = True
    metrics = (Metric("router_accuracy", "router accuracy", unit="share"),)

    # -- planning ----------------------------------------------------------------------
    def prepare_options(self, options, context) -> dict[str, Any]:
        opts = dict(options or {})
        available = list(context.tasks or [])
        tasks = opts.get("tasks")
        if tasks is None:
            if not available:
                raise OptionError(
                    "moa needs the task names of the training data, which this data source "
                    "does not give before it is read: set data.tasks, or the method's `tasks` option"
                )
            tasks = available
        if isinstance(tasks, str) or not isinstance(tasks, list) or not tasks:
            raise OptionError(f"moa option tasks = {tasks!r}; expected a non-empty list of task names")
        unknown = [t for t in tasks if available and t not in available]
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if unknown or dup:
            raise OptionError(
                f"moa option tasks = {tasks!r}: "
                + (f"{unknown} not in the training data" if unknown else f"{dup} listed twice")
                + f"; tasks of the training data: {available}"
            )
        opts["tasks"] = list(tasks)
        if context.steps:
            if opts.get("task_steps") is None:
                opts["task_steps"] = math.ceil(context.steps / len(available or tasks))
            if opts.get("router_steps") is None:
                opts["router_steps"] = math.ceil(context.steps / len(tasks))
        return opts

    def variants(self, request, options=None) -> list[Variant]:
        tasks = (options or {}).get("tasks")
        if not tasks:
            raise BudgetError(
                "moa's variant (T task adapters) depends on the task list: give the options "
                "prepare_options returned (with 'tasks')"
            )
        return [Variant(len(tasks), f"T{len(tasks)}")]

    def solve(self, request, variant, shapes, options=None) -> MoAConfig:
        options = dict(options or {})
        tasks = options.get("tasks")
        if not tasks:
            self.variants(request, options)  # raises with the explanation
        T, R, K = len(tasks), request.total_rank, request.active_rank
        if R % T:
            lower, upper = T * (R // T), T * (R // T + 1)
            near = [v for v in (lower, upper) if v >= T]
            divisors = [t for t in range(1, R + 1) if R % t == 0 and (K % (R // t) == 0)]
            raise BudgetError(
                f"moa trains one LoRA per task: per-task rank = total_rank/T = {R}/{T} = "
                f"{R / T:.3g} is not a whole number (T = {T} tasks: {', '.join(tasks)}); "
                f"feasible total ranks for T={T}: multiples of {T}; nearest: {near}; or give "
                f"the method's `tasks` option a number of tasks T in {divisors} "
                f"(feasible for R={R}, K={K})"
            )
        r = R // T
        if K % r:
            feasible = [r * j for j in range(1, T + 1)]
            raise BudgetError(
                f"moa with T={T} task adapters of rank r = R/T = {R}/{T} = {r}: top-k = "
                f"active_rank/r = {K}/{r} = {K / r:.3g}, not a whole number of adapters; "
                f"feasible active ranks for R={R}, T={T}: {feasible}; nearest: "
                f"{nearest(feasible, K)}"
            )
        config = self.configure(
            options, alpha=request.alpha, num_experts=T, expert_rank=r, top_k=K // r
        )
        if config.top_k == 1 and config.router_supervision <= 0:
            raise BudgetError(
                f"moa with top-1 routing (K/r = {K}/{r}) needs router_supervision > 0 (got "
                f"{config.router_supervision}): the chosen adapter acts at full strength, so "
                "the task-label loss is the router's only training signal"
            )
        if request.router == "counted":
            # one adapter per task: only the per-task rank may shrink, never the count
            config = fit_router_counted(self, config, request, shapes, vary_experts=False)
        return config

    def describe(self, config: MoAConfig) -> dict[str, Any]:
        return {**super().describe(config), "level": config.level}

    def components(self, config: MoAConfig, seed: int):
        return [task_lora(task, config.expert_rank, config.alpha, config.task_steps) for task in config.tasks or []]

    # -- building and loading ----------------------------------------------------------
    def apply(self, model, targets, config: MoAConfig) -> None:
        super().apply(model, targets, config)
        for target in targets:
            model.get_submodule(target.name).supervision_scale = 1.0 / len(targets)

    def load_components(self, handle, components) -> None:
        """Stack the stage-one LoRAs (one folder per task, in ``config.tasks`` order) into the
        rank blocks of every MoA layer and freeze them; only the routers stay trainable."""
        config: MoAConfig = handle.config
        tasks = list(config.tasks or [])
        if len(components) != config.num_experts or len(tasks) != config.num_experts:
            raise ComponentError(
                f"moa with {config.num_experts} experts got {len(components)} task-adapter "
                f"folders for tasks {tasks}"
            )
        check_compatible(components)
        load_task_loras(handle, list(components), tasks)

    def compose_config(self, components: Sequence, options: dict[str, Any]) -> MoAConfig:
        """A MoA config over existing task-adapter folders (in router order): their rank,
        alpha and steps; ``options`` may set ``top_k`` (default 1), ``level``,
        ``router_supervision``, ``router_lr`` and ``router_steps`` (default: the adapters'
        own step count)."""
        check_compatible(components)
        first = components[0]
        rank, alpha = first.adapter["config"]["rank"], first.adapter["config"]["alpha"]
        opts = dict(options)
        top_k = opts.pop("top_k", 1)
        T = len(components)
        if not isinstance(top_k, int) or not 1 <= top_k <= T:
            raise OptionError(f"moa option top_k = {top_k!r}; valid: 1 to the {T} adapters")
        steps = first.effective.get("steps")
        opts.setdefault("router_steps", steps)
        return self.make_config(
            alpha=alpha,
            num_experts=T,
            expert_rank=rank,
            top_k=top_k,
            tasks=[task_of(c) for c in components],
            task_steps=steps,
            **opts,
        )

    # -- training ----------------------------------------------------------------------
    def training_tasks(self, config: MoAConfig) -> list[str] | None:
        return list(config.tasks) if config.tasks else None

    def training_steps(self, config: MoAConfig, default_steps: int) -> int | None:
        if config.router_steps is not None:
            return config.router_steps
        return max(1, math.ceil(default_steps / config.num_experts))

    def learning_rate(self, config: MoAConfig, default_lr: float) -> float | None:
        return config.router_lr

    def task_label_ids(self, config: MoAConfig, tasks: list[str]) -> torch.Tensor:
        order = {t: i for i, t in enumerate(config.tasks or [])}
        return torch.tensor([order.get(t, -1) for t in tasks], dtype=torch.long)

    # -- evaluation --------------------------------------------------------------------
    def evaluation_metrics(self, config: MoAConfig, routing) -> dict[str, Any]:
        """``router_accuracy``: the share of (adapted module, scored sequence) pairs whose
        chosen adapter is the sequence's task's (per task: ``router_accuracy_by_task``);
        tasks without an adapter are left out."""
        tasks = list(config.tasks or [])
        by_task: dict[str, float] = {}
        for t in tasks:
            values = [shares[t][tasks.index(t)] for shares in routing.shares.values() if t in shares]
            if values and routing.sequences.get(t):
                by_task[t] = round(sum(values) / len(values), 6)
        if not by_task:
            return {"router_accuracy": None, "router_accuracy_by_task": {}}
        n = {t: routing.sequences[t] for t in by_task}
        overall = sum(by_task[t] * n[t] for t in by_task) / sum(n.values())
        return {"router_accuracy": round(overall, 6), "router_accuracy_by_task": by_task}



