"""Adapter methods: the shared block-gated core, one module per method, and the registry."""

from harness.methods.base import (
    AdapterLayer,
    BudgetError,
    Method,
    MethodConfig,
    ParamCount,
    TargetShape,
    TrainingHooks,
)
from harness.methods.mixture import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    MixtureConfig,
    Routing,
)
from harness.methods.registry import (
    PluginError,
    UnknownMethodError,
    all_methods,
    get_method,
    load_plugin,
    register,
)

__all__ = [
    "AdapterLayer",
    "BlockMixtureLayer",
    "BlockMixtureMethod",
    "BudgetError",
    "Method",
    "MethodConfig",
    "MixtureConfig",
    "ParamCount",
    "PluginError",
    "Routing",
    "TargetShape",
    "TrainingHooks",
    "UnknownMethodError",
    "all_methods",
    "get_method",
    "load_plugin",
    "register",
]
