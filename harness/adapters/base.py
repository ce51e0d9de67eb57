"""What every adapter method provides: counts, a layer, and the training hooks.

The split follows peft's ``tuners/lora``: a *config* (a dataclass of
hyperparameters), a *layer* (an ``nn.Module`` that wraps one frozen
``nn.Linear``) and the *method* (the registry entry that says how to count,
how to derive a config from a budget and how to put layers into a model).

Every layer adds ``delta(x)`` to the frozen output ``W0 x``:

    y = W0 x + delta(x)

Training-loop interface (the only thing the loop knows about layers):

* ``aux_loss()``            -> scalar tensor or ``None``; added to the task loss.
* ``after_optimizer_step()``-> called once after every optimizer step.
* ``expert_load()``         -> per-expert share of the last batch's routing, or ``None``.

Any ``nn.Module`` inside the model that has these methods takes part, so a
plugin needs no change to the training loop. During evaluation a routed layer also
keeps each token's expert shares when asked (``record_routing``), so the engine can
say which experts each task uses (:meth:`AdapterLayer.keep_routing`).

What the engine asks of a :class:`Method` beyond one layer (all optional, all given
only what they need, never the study config): its variants, its options completed from
the data's task names and step count (:class:`PlanContext`), the parts trained by
earlier jobs (:class:`~harness.adapters.components.Component`), the training items,
steps and learning rate of a run, and extra evaluation numbers.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from harness.adapters.grid import BudgetRequest, ParamCount, TargetShape, Variant, layer_positions
from harness.adapters.metrics import Metric
from harness.adapters.routing import TokenBatch

if TYPE_CHECKING:
    from harness.adapters.components import Component, ComponentInfo
    from harness.adapters.routing import Routing, RoutingRecord


@dataclass
class MethodConfig:
    """Hyperparameters shared by every method. ``alpha`` is the LoRA scaling numerator."""

    alpha: float = 16.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PlanContext:
    """What a method may know about the study when its options are completed: the task
    names of the training data (``None`` when the data source cannot name them without
    reading a hub) and the configured optimizer steps (``None`` when ``train.epochs`` is
    used instead)."""

    tasks: tuple[str, ...] | None
    steps: int | None


class TrainingHooks:
    """Mixin: the three calls the training loop makes on every module that has them.

    An auxiliary loss (load balancing, router supervision, ...) is handed over with
    :meth:`add_aux_loss` during the forward; the training loop collects it once per step
    through :meth:`aux_loss` and adds it to the task loss (nothing to override)."""

    _pending_aux: dict[str, torch.Tensor] | None = None

    def add_aux_loss(self, loss: torch.Tensor, name: str = "aux") -> None:
        """Hand over this forward's auxiliary loss ``loss`` (a scalar tensor, already weighted).
        Losses of different ``name`` add up; a second value of the same name replaces the
        first (a forward recomputed by gradient checkpointing hands its loss over again)."""
        if self._pending_aux is None:
            self._pending_aux = {}
        self._pending_aux[name] = loss

    def aux_loss(self) -> torch.Tensor | None:
        """This step's auxiliary loss (``None``: none), handed over once and then cleared."""
        pending, self._pending_aux = self._pending_aux, None
        if not pending:
            return None
        values = list(pending.values())
        total = values[0]
        for value in values[1:]:
            total = total + value
        return total

    def after_optimizer_step(self) -> None:
        return None

    def expert_load(self) -> torch.Tensor | None:
        return None


class AdapterLayer(TrainingHooks, nn.Module):
    """A frozen ``nn.Linear`` plus an additive adapter ``delta``.

    ``token_mask`` (a flat bool tensor over the leading dimensions of ``x``, or
    ``None``) marks real tokens; routers use it so padding neither consumes
    capacity nor counts in load statistics. The model-level handle sets it.

    ``record_routing`` (set by the handle during evaluation): a routed layer then keeps
    each token's expert shares of its last forward in ``routing_shares`` (``(N, E)``,
    float32, detached, rows sum to 1) through :meth:`keep_routing`.
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
        self.tokens: TokenBatch | None = None  # shared by the layers of one forward
        self.record_routing = False
        self.routing_shares: torch.Tensor | None = None

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
        if mask.dim() == 1 and mask.dtype == torch.bool and mask.device == device:
            return mask  # the handle's own tensor: :meth:`token_batch` recognises it
        return mask.reshape(-1).to(device=device, dtype=torch.bool)

    def token_batch(self, mask: torch.Tensor | None) -> TokenBatch:
        """The forward's shared :class:`TokenBatch` for ``mask`` (a private one when the layer
        runs outside the handle's :meth:`~AdapterHandle.token_mask`)."""
        tokens = self.tokens
        return tokens if tokens is not None and tokens.mask is mask else TokenBatch(mask)

    def keep_routing(self, routing: Routing, n_experts: int) -> None:
        """Keep the per-token expert shares of ``routing`` when the handle asked for them
        (evaluation); a plugin layer with its own structure calls this after routing."""
        if self.record_routing:
            self.routing_shares = routing.token_shares(n_experts)


def kaiming_uniform_like_peft(weight: torch.Tensor) -> None:
    """peft initialises LoRA's A with Kaiming-uniform, ``a = sqrt(5)`` (nn.Linear's default)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


def router_init(weight: torch.Tensor, std: float = 0.02) -> None:
    nn.init.normal_(weight, mean=0.0, std=std)


def replace_linears(
    model: nn.Module, names: list[str], make: Callable[[nn.Linear], nn.Module]
) -> None:
    """Replace each named ``nn.Linear`` in ``model`` by ``make(linear)``."""
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, child)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"target module {name!r} is {type(base).__name__}, not nn.Linear")
        setattr(parent, child, make(base))


class Method(ABC):
    """A registry entry. Subclasses set the class attributes and implement the abstract calls.

    * ``count(config, shape)``: analytic parameter counts for one adapted layer.
    * ``variants(request, options)``: the points this method runs at (one per granularity
      by default; references and staged methods choose their own).
    * ``solve(request, variant, shapes, options)``: the config that meets the study's
      budget at that variant, or :class:`~harness.adapters.errors.BudgetError`.
    * ``make_layer(base, config)``: the adapter layer for one frozen linear layer
      (methods that inject differently, such as peft's LoRA, override ``apply``).
    * ``describe(config)``: ``num_experts``, ``expert_rank`` and ``top_k`` (the columns of
      every table; for a method without experts: 1, its rank, 1) plus any other short
      values worth a column (shown in the budget table's ``extra`` column).
    """

    name: ClassVar[str]
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    #: how tables and figures print the method (default: ``name``)
    display_name: ClassVar[str] = ""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig
    routed: ClassVar[bool] = False
    #: dense methods use every parameter for every token and cannot match the activated budget
    dense: ClassVar[bool] = True
    #: whether the method takes part in the granularity sweep (False: one run per seed)
    sweeps_granularity: ClassVar[bool] = True
    #: the training loop passes each example's task name to the model (``AdapterHandle.task_labels``)
    needs_task_labels: ClassVar[bool] = False
    #: the reference the study compares every method with (peft's LoRA at ranks R and K)
    is_reference: ClassVar[bool] = False
    #: the trained update is one fixed matrix per adapted layer (dense and independent of the
    #: input: ``delta(x) = D x``), so ``python -m harness export --merge`` may add it to the
    #: base weights (a routed or input-gated method never can)
    mergeable: ClassVar[bool] = False
    #: an ablation names the method it changes one thing of: the significance table then
    #: compares the two at every granularity both ran (e.g. SMoRA with the paper's bias rate)
    ablation_of: ClassVar[str | None] = None
    #: the numbers :meth:`evaluation_metrics` returns, declared once (name, label, unit,
    #: higher-is-better): the tables print each in its unit
    metrics: ClassVar[tuple[Metric, ...]] = ()

    @property
    def label(self) -> str:
        return self.display_name or self.name

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

    def variants(self, request: BudgetRequest, options: dict[str, Any] | None = None) -> list[Variant]:
        """The variants of this study; ``options`` are those :meth:`prepare_options` returned."""
        if not self.sweeps_granularity:
            return [Variant(1, "G1")]
        return [Variant(g, f"G{g}") for g in request.granularities]

    def apply(self, model: nn.Module, targets: list[TargetShape], config: MethodConfig) -> None:
        """Put this method's adapter into ``model`` in place (frozen base layers stay frozen);
        each target gets :meth:`layer_config` of its depth."""
        positions = layer_positions(targets)
        for t in targets:
            layer_config = self.layer_config(config, *positions[t.name])
            replace_linears(model, [t.name], lambda base, c=layer_config: self.make_layer(base, c))

    def layer_config(self, config: MethodConfig, layer: int, layers: int) -> MethodConfig:
        """The config of the adapter on the ``layer``-th of the ``layers`` adapted decoder
        layers (0 = the lowest; positions come from the target names, see
        :func:`~harness.adapters.grid.layer_positions`). Default: the same config at every
        depth. A method whose adapter varies with depth (MoLA: more experts in higher
        layers) returns each layer's own config here; :meth:`count_model`, :meth:`apply`
        and the budget's real-``numel`` check all go through it, so the study's totals are
        the sums over the layers. A config already resolved to one layer must come back
        unchanged (a lone layer is position 0 of 1)."""
        return config

    @abstractmethod
    def describe(self, config: MethodConfig) -> dict[str, Any]: ...

    def budget_note(self, config: MethodConfig) -> str | None:
        """What the budget table's note says of this method's activated parameters (``None``:
        the engine's default: "dense: ..." for a dense method, the deviation from LoRA rank
        K otherwise). A method whose experts per token vary (a threshold router) says so here."""
        return None

    def is_dense(self, config: MethodConfig) -> bool:
        """True when every parameter shapes every token, so activated equals total and the
        activated budget cannot be matched."""
        return self.dense

    def make_layer(self, base: nn.Linear, config: MethodConfig) -> AdapterLayer:
        raise NotImplementedError(f"method {self.name!r} does not build per-layer adapters")

    def make_config(self, **values: Any) -> MethodConfig:
        """Build the config from plain values, naming any unknown key."""
        from harness.adapters.errors import OptionError

        fields = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(values) - fields)
        if unknown:
            raise OptionError(
                f"method {self.name!r} has no option(s) {', '.join(map(repr, unknown))}; "
                f"valid options: {', '.join(sorted(fields))}"
            )
        return self.config_cls(**values)

    def configure(self, options: dict[str, Any] | None, **derived: Any) -> MethodConfig:
        """The config from the user's ``options`` plus the values the budget solver ``derived``."""
        from harness.adapters.errors import OptionError

        options = dict(options or {})
        clash = sorted(set(options) & set(derived))
        if clash:
            raise OptionError(
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
        """Counts summed over the adapted modules, each with its depth's :meth:`layer_config`."""
        shapes = list(shapes)
        if type(self).layer_config is Method.layer_config:
            return ParamCount.sum(self.count(config, s) for s in shapes)
        positions = layer_positions(shapes)
        return ParamCount.sum(self.count(self.layer_config(config, *positions[s.name]), s) for s in shapes)

    # -- optional hooks (no-ops by default) -----------------------------------------------
    def prepare_options(self, options: dict[str, Any], context: PlanContext) -> dict[str, Any]:
        """The method's options completed from what the study knows (the data's task names,
        the step count), before the budget is solved. Raise ``OptionError`` for bad ones."""
        return dict(options or {})

    def components(self, config: MethodConfig, seed: int) -> list[Component]:
        """Parts trained by separate jobs before this run (e.g. one LoRA per task). The
        engine names, hashes and trains each like a run; :meth:`load_components` gets
        their folders back, in this order."""
        return []

    def load_components(self, handle: Any, components: Sequence[ComponentInfo]) -> None:
        """Load the finished :meth:`components` into the built model and freeze them
        (``handle.add_frozen``)."""
        if components:
            raise ValueError(
                f"method {self.name!r} takes no trained components, got {len(components)}"
            )

    def compose_config(self, components: Sequence[ComponentInfo], options: dict[str, Any]) -> MethodConfig:
        """A config built from existing component folders (``python -m harness compose``)."""
        raise NotImplementedError(f"method {self.name!r} is not built from components")

    def training_tasks(self, config: MethodConfig) -> list[str] | None:
        """Train only on the items of these tasks (``None``: the whole training mixture)."""
        return None

    def training_steps(self, config: MethodConfig, default_steps: int) -> int | None:
        """Optimizer steps of a run (``None``: ``default_steps``, the study's own count)."""
        return None

    def learning_rate(self, config: MethodConfig, default_lr: float) -> float | None:
        """Peak learning rate of a run (``None``: ``default_lr``, the study's ``train.lr``)."""
        return None

    def task_label_ids(self, config: MethodConfig, tasks: list[str]) -> torch.Tensor:
        """Task names -> indices the layers understand (-1: no label); see ``needs_task_labels``."""
        raise NotImplementedError(f"method {self.name!r} does not use task labels")

    def export_peft(
        self, config: MethodConfig, state: dict[str, torch.Tensor], targets: list[TargetShape],
        folder: Any, base_model: str,
    ) -> None:
        """Write a trained adapter (``state``, as ``AdapterHandle.adapter_state_dict`` gives it)
        as a peft adapter folder that lm-eval's ``hf`` model loads with ``peft=<folder>``;
        only methods peft itself implements can (the identity check scores such a run both
        ways)."""
        raise NotImplementedError(f"method {self.name!r} is not a peft adapter")

    def evaluation_metrics(self, config: MethodConfig, routing: RoutingRecord) -> dict[str, Any]:
        """Extra numbers for ``metrics.json`` from the evaluation's routing record (which
        experts each task's scored sequences used). Scalars become columns of the summary
        and the main table (mean over seeds), shown as :attr:`metrics` declares them (a
        ``share`` in percent, a ``count`` as is; an undeclared number as a plain score)."""
        return {}
