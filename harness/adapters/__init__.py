"""The adapter toolkit every method plugin builds on (and the only part of the harness a
plugin imports).

* :mod:`~harness.adapters.base` — ``Method`` (the registry entry), ``MethodConfig``,
  ``AdapterLayer`` (a frozen ``nn.Linear`` plus ``delta``), the training hooks;
* :mod:`~harness.adapters.mixture` — ``BlockMixtureLayer`` / ``BlockMixtureMethod``: a
  mixture of LoRA experts as rank blocks of one LoRA; a routed method only writes ``route``;
* :mod:`~harness.adapters.core` — the block-gated low-rank kernels (dense and sparse);
* :mod:`~harness.adapters.routing` — ``Routing`` and the vectorised routing pieces
  (top-k, capacity, load shares, load-balancing loss), free of host synchronisation;
* :mod:`~harness.adapters.distributed` — routing statistics and batch-wide losses summed
  over data-parallel ranks (``reduce_across_ranks``, ``across_ranks``; identity in one process);
* :mod:`~harness.adapters.grid` — budget primitives: ``BudgetRequest``, ``ParamCount``,
  ``TargetShape``, ``Variant``, the standard granularity grid, the counted-router fit;
* :mod:`~harness.adapters.components` — parts trained by earlier jobs (staged methods);
* :mod:`~harness.adapters.inject` — putting a method into a model (``apply_method``) and
  the ``AdapterHandle`` the training loop talks to;
* :mod:`~harness.adapters.registry` — names -> methods, plugins, entry points;
* :mod:`~harness.adapters.metrics` — ``Metric``: a metric declared once (name, unit, label);
* :mod:`~harness.adapters.testing` — checks a plugin author runs on a layer.

Nothing here imports the engine (study planning, training, evaluation, workflow).
"""

from harness.adapters.base import (
    AdapterLayer,
    Method,
    MethodConfig,
    PlanContext,
    TrainingHooks,
    kaiming_uniform_like_peft,
    replace_linears,
    router_init,
)
from harness.adapters.components import Component, ComponentInfo, read_component
from harness.adapters.errors import (
    BudgetError,
    ComponentError,
    CountMismatchError,
    OptionError,
    PluginError,
    UnknownMethodError,
)
from harness.adapters.grid import BudgetRequest, ParamCount, TargetShape, Variant
from harness.adapters.inject import AdapterHandle, apply_method, trainable_numel
from harness.adapters.metrics import Metric
from harness.adapters.mixture import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    MixtureConfig,
    mixture_counts,
)
from harness.adapters.registry import (
    all_methods,
    get_method,
    load_plugin,
    reference_method,
    register,
)
from harness.adapters.routing import Routing

__all__ = [
    "AdapterHandle",
    "AdapterLayer",
    "BlockMixtureLayer",
    "BlockMixtureMethod",
    "BudgetError",
    "BudgetRequest",
    "Component",
    "ComponentError",
    "ComponentInfo",
    "CountMismatchError",
    "Method",
    "MethodConfig",
    "Metric",
    "MixtureConfig",
    "OptionError",
    "ParamCount",
    "PlanContext",
    "PluginError",
    "Routing",
    "TargetShape",
    "TrainingHooks",
    "UnknownMethodError",
    "Variant",
    "all_methods",
    "apply_method",
    "get_method",
    "kaiming_uniform_like_peft",
    "load_plugin",
    "mixture_counts",
    "read_component",
    "reference_method",
    "register",
    "replace_linears",
    "router_init",
    "trainable_numel",
]
