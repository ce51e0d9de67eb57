"""Make ``lm_eval --model moe-lora`` work from the command line.

lm-eval finds models only in its own registry and has no plugin entry point for
them, so the one-line ``harness_lm_eval.pth`` (installed into site-packages with
this package) imports this module at interpreter start. It imports nothing else —
not even the ``harness`` package, so the harness that runs is the one ``sys.path``
finds when the model is used (the current checkout for ``python -m harness``), never
one fixed at interpreter start. It waits for ``lm_eval.api.registry`` to be imported
and then registers the harness's model class lazily, by import path, beside
lm-eval's own models.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

MODEL_NAME = "moe-lora"
MODEL_TARGET = "harness.model.lm_eval_model:HarnessLM"
_WATCHED = "lm_eval.api.registry"


def register_into(registry_module) -> None:
    import lm_eval.models  # noqa: F401  (registers lm-eval's own lazy models first)

    registry = registry_module.model_registry
    if MODEL_NAME not in registry:
        registry.register(MODEL_NAME, target=MODEL_TARGET)


class _RegistryWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if fullname != _WATCHED:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module):
            exec_module(module)
            register_into(module)

        spec.loader.exec_module = exec_and_register
        return spec


if _WATCHED in sys.modules:
    register_into(sys.modules[_WATCHED])
elif not any(isinstance(f, _RegistryWatcher) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegistryWatcher())
