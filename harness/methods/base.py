"""What every adapter method provides: counts, a layer, and the training hooks.

The split follows peft's ``tuners/lora``: a *config* (a dataclass of
hyperparameters), a *layer* (an ``nn.Module`` that wraps one frozen
``nn.Linear``) and the *method* (the registry entry that says how to count,
how to derive a config from a budget and how to put layers into a model).

Every layer adds ``delta(x)`` to the frozen output ``W0 x``:

    y = W0 x + delta(x)

Training-loop interface (the only thing the loop knows about methods):

* ``aux_loss()``            -> scalar tensor or ``None``; added to the task loss.
* ``after_optimizer_step()``-> called once after every optimizer step.
* ``expert_load()``         -> per-expert share of the last batch's routing, or ``None``.

Any ``nn.Module`` inside the model that has these methods takes part, so a
plugin needs no change to the training loop.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from harness.budget import BudgetRequest


class BudgetError(ValueError):
    """An infeasible budget request; the message names the value and the nearest feasible ones."""


@dataclass(frozen=True)
class ParamCount:
    """Trainable adapter parameters: ``total`` that exist, ``activated`` that shape one
    token's output, and ``router`` (gate) parameters, which are counted inside both."""

    total: int
    activated: int
    router: int

    def __add__(self, other: ParamCount) -> ParamCount:
        return ParamCount(
            self.total + other.total,
            self.activated + other.activated,
            self.router + other.router,
        )

    @staticmethod
    def sum(counts: Iterable[ParamCount]) -> ParamCount:
        out = ParamCount(0, 0, 0)
        for c in counts:
            out = out + c
        return out


@dataclass(frozen=True)
class TargetShape:
    """One adapted linear layer: its qualified name and its shape ``d_in -> d_out``."""

    name: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class Variant:
    """One point of a method's sweep: ``granularity`` rank blocks (1 for a single LoRA),
    a short ``tag`` for run ids (``G8``, ``r64``) and, for references, its ``role``."""

    granularity: int
    tag: str
    rank: int | None = None
    role: str = ""


@dataclass
class MethodConfig:
    """Hyperparameters shared by every method. ``alpha`` is the LoRA scaling numerator."""

    alpha: float = 16.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class TrainingHooks:
    """Mixin: the three calls the training loop makes on every module that has them."""

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def after_optimizer_step(self) -> None:
        return None

    def expert_load(self) -> torch.Tensor | None:
        return None


class AdapterLayer(TrainingHooks, nn.Module):
    """A frozen ``nn.Linear`` plus an additive adapter ``delta``.

    ``token_mask`` (a flat bool tensor over the leading dimensions of ``x``, or
    ``None``) marks real tokens; routers use it so padding neither consumes
    capacity nor counts in load statistics. The model-level handle sets it.
    """

    def __init__(self, base_layer: nn.Linear):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.token_mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.delta(x).to(x.dtype)

    @abstractmethod
    def delta(self, x: torch.Tensor) -> torch.Tensor: ...

    def _flat_mask(self, n_tokens: int, device: torch.device) -> torch.Tensor | None:
        mask = self.token_mask
        if mask is None:
            return None
        if mask.numel() != n_tokens:
            raise ValueError(
                f"token mask has {mask.numel()} entries but the layer saw {n_tokens} tokens"
            )
        return mask.reshape(-1).to(device=device, dtype=torch.bool)


def kaiming_uniform_like_peft(weight: torch.Tensor) -> None:
    """peft initialises LoRA's A with Kaiming-uniform, ``a = sqrt(5)`` (nn.Linear's default)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def router_init(weight: torch.Tensor, std: float = 0.02) -> None:
    nn.init.normal_(weight, mean=0.0, std=std)


class Method(ABC):
    """A registry entry. Subclasses set the class attributes and implement the abstract calls.

    * ``count(config, shape)``: analytic parameter counts for one adapted layer.
    * ``variants(request)``: the points this method runs at (one per granularity by default).
    * ``solve(request, variant, shapes, options)``: the config that meets the study's
      budget at that variant, or :class:`BudgetError`.
    * ``make_layer(base, config)``: the adapter layer for one frozen linear layer
      (methods that inject differently, such as peft's LoRA, override ``apply``).
    * ``describe(config)``: expert count, expert rank and top-k for tables.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    routed: ClassVar[bool] = False
    #: dense methods use every parameter for every token and cannot match the activated budget
    dense: ClassVar[bool] = True
    #: whether the method takes part in the granularity sweep (False: one run per seed)
    sweeps_granularity: ClassVar[bool] = True
    #: the training loop passes each example's task name to the model (``AdapterHandle.task_labels``)
    needs_task_labels: ClassVar[bool] = False

    @abstractmethod
    def count(self, config: MethodConfig, shape: TargetShape) -> ParamCount: ...

    @abstractmethod
    def solve(
        self,
        request: BudgetRequest,
        variant: Variant,
        shapes: list[TargetShape],
        options: dict[str, Any] | None = None,
    ) -> MethodConfig: ...

    def variants(self, request: BudgetRequest) -> list[Variant]:
        if not self.sweeps_granularity:
            return [Variant(1, "G1")]
        return [Variant(g, f"G{g}") for g in request.granularities]

    def apply(self, model: nn.Module, targets: list[TargetShape], config: MethodConfig) -> None:
        """Put this method's adapter into ``model`` in place (frozen base layers stay frozen)."""
        from harness.methods.inject import replace_linears

        replace_linears(model, [t.name for t in targets], lambda base: self.make_layer(base, config))

    @abstractmethod
    def describe(self, config: MethodConfig) -> dict[str, Any]: ...

    def is_dense(self, config: MethodConfig) -> bool:
        """True when every parameter shapes every token, so activated equals total and the
        activated budget cannot be matched."""
        return self.dense

    def make_layer(self, base: nn.Linear, config: MethodConfig) -> AdapterLayer:
        raise NotImplementedError(f"method {self.name!r} does not build per-layer adapters")

    def make_config(self, **values: Any) -> MethodConfig:
        """Build the config from plain values, naming any unknown key."""
        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise ValueError(
                f"method {self.name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(fields))}"
            )
        return self.config_cls(**values)

    def configure(self, options: dict[str, Any] | None, **derived: Any) -> MethodConfig:
        """The config from the user's ``options`` plus the values the budget solver ``derived``."""
        options = dict(options or {})
        clash = sorted(set(options) & set(derived))
        if clash:
            raise ValueError(
                f"method {self.name!r}: option(s) {', '.join(map(repr, clash))} are set by the "
                "budget solver from total_rank, active_rank and the granularity; remove them "
                "from the method's options"
            )
        return self.make_config(**options, **derived)

    def hyperparameters(self) -> dict[str, Any]:
        """Option name -> default, for ``python -m harness methods``."""
        out = {}
        for f in dataclasses.fields(self.config_cls):
            if f.default is not dataclasses.MISSING:
                out[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                out[f.name] = f.default_factory()
            else:
                out[f.name] = "<from budget>"
        return out

    def count_model(self, config: MethodConfig, shapes: Iterable[TargetShape]) -> ParamCount:
        return ParamCount.sum(self.count(config, s) for s in shapes)

    # -- optional hooks for methods trained in stages (all no-ops by default) ----------------
    def study_options(self, study: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        """The method's options completed from the study config (e.g. the data's task list),
        before the budget is solved."""
        return dict(options or {})

    def plan_variants(self, request: BudgetRequest, options: dict[str, Any]) -> list[Variant]:
        """The variants of this study; ``options`` are those :meth:`study_options` returned."""
        return self.variants(request)

    def components(self, study: dict[str, Any], config: MethodConfig, seed: int) -> list[Any]:
        """Parts trained by separate jobs before this run (MoA's per-task LoRAs). Each has a
        ``path`` (relative to ``out_dir``) holding ``train.json`` and ``adapter/`` when done."""
        return []

    def load_components(self, handle: Any, paths: list[Any]) -> None:
        """Load the finished :meth:`components` (folders, in order) into the built model and
        freeze them (register them with ``handle.add_frozen``)."""
        if paths:
            raise ValueError(f"method {self.name!r} takes no trained components, got {len(paths)}")

    def training_tasks(self, config: MethodConfig) -> list[str] | None:
        """Train only on the items of these tasks (``None``: the whole training mixture)."""
        return None

    def training_steps(
        self, config: MethodConfig, train: dict[str, Any], n_examples: int
    ) -> int | None:
        """Optimizer steps of a run (``None``: ``train.steps``, or ``train.epochs`` over the data)."""
        return None

    def learning_rate(self, config: MethodConfig, train: dict[str, Any]) -> float | None:
        """Peak learning rate of a run (``None``: ``train.lr``)."""
        return None

    def task_label_ids(self, config: MethodConfig, tasks: list[str]) -> torch.Tensor:
        """Task names -> indices the layers understand (-1: no label); see ``needs_task_labels``."""
        raise NotImplementedError(f"method {self.name!r} does not use task labels")

    def evaluation_metrics(self, loaded: Any, data_dir: Any) -> dict[str, Any]:
        """Extra numbers for ``metrics.json`` computed on the loaded run (e.g. router accuracy)."""
        return {}
