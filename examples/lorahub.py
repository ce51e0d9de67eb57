"""A staged method plugin: task LoRAs trained first (components), then only their mixing weights.

LoraHub-style composition — Huang et al. 2023, "LoraHub: Efficient Cross-Task
Generalization via Dynamic LoRA Composition", arXiv 2307.13269 — with the weights learned
by gradient descent here instead of the paper's gradient-free search:

    delta(x) = sum_t w_t · (alpha / r) · B_t A_t x,    w_t learned, one per task, shared by all tokens

Stage one: one peft LoRA of rank ``r = R/T`` per task of the training data, each trained on
its own task's items (``components``: the toolkit's shared task LoRAs, which the engine
trains, names and hashes like runs; a study with MoA at the same rank and steps trains them
once for both).
Stage two: the ``T`` LoRAs are stacked as rank blocks (frozen) and only ``w`` (init
``1/T``) trains, on the whole mixture, for ``ceil(steps / T)`` steps. Budget: total =
``T·r·(d_in + d_out) + T`` = LoRA rank R's plus the weights; every block is used for every
token (dense), so the activated budget is not matched.

The in-tree model of a staged method is MoA (``methods/moa``): a router per module
instead of global weights, task-label supervision, ``compose``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from harness.adapters import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    Component,
    MixtureConfig,
    OptionError,
    ParamCount,
    Routing,
    TargetShape,
    Variant,
    mixture_counts,
    register,
)
from harness.adapters.task_loras import load_task_loras, task_lora


@dataclass
class LoraHubConfig(MixtureConfig):
    tasks: list[str] | None = None
    task_steps: int | None = None


class LoraHubLayer(BlockMixtureLayer):
    has_router = False

    def __init__(self, base_layer: nn.Linear, config: LoraHubConfig, scaling: float):
        super().__init__(base_layer, config, scaling)
        self.weights = nn.Parameter(torch.full((config.num_experts,), 1.0 / config.num_experts))

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        return Routing(gate=self.weights)  # one weight per task LoRA, shared by every token


@register
class LoraHub(BlockMixtureMethod):
    name = "lorahub"
    display_name = "LoraHub"
    description = "task LoRAs trained separately, then only their mixing weights (dense)"
    paper = "Huang et al. 2023, arXiv 2307.13269 (weights learned by gradient)"
    config_cls = LoraHubConfig
    layer_cls = LoraHubLayer
    routed = False
    dense = True
    sweeps_granularity = False

    def prepare_options(self, options, context):
        opts = dict(options or {})
        tasks = opts.setdefault("tasks", list(context.tasks or []))
        if not tasks:
            raise OptionError("lorahub needs the task names of the training data: set data.tasks")
        if context.steps and opts.get("task_steps") is None:
            # one joint run's steps shared by the data's tasks (as MoA: the same task LoRAs)
            opts["task_steps"] = math.ceil(context.steps / len(context.tasks or tasks))
        return opts

    def variants(self, request, options=None) -> list[Variant]:
        return [Variant(len(options["tasks"]), f"T{len(options['tasks'])}")]

    def uses_top_k(self, options) -> bool:
        return False  # dense: every task LoRA for every token

    def count(self, config: LoraHubConfig, shape: TargetShape) -> ParamCount:
        return mixture_counts(shape, config.num_experts, config.expert_rank, None, False, config.num_experts)

    def components(self, config: LoraHubConfig, seed: int) -> list[Component]:
        return [task_lora(t, config.expert_rank, config.alpha, config.task_steps) for t in config.tasks or []]

    def load_components(self, handle, components) -> None:
        load_task_loras(handle, list(components), list(handle.config.tasks))

    def training_steps(self, config: LoraHubConfig, default_steps: int) -> int:
        return max(1, math.ceil(default_steps / config.num_experts))
