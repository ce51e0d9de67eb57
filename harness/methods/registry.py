"""The method registry: built-in methods, plugins by import path, and the ``harness.methods``
entry-point group.

A plugin is a Python module that defines a :class:`~harness.methods.base.Method`
subclass and decorates it with :func:`register`. It is found either by its import
path written in the study config (``plugins: [my_pkg.my_method]``) or by an entry
point in the ``harness.methods`` group of an installed package.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from harness.methods.base import Method

ENTRY_POINT_GROUP = "harness.methods"
BUILTIN_MODULES = (
    "harness.methods.lora",
    "harness.methods.multilora",
    "harness.methods.molora",
    "harness.methods.sira",
    "harness.methods.smora",
    "harness.methods.malora",
    "harness.methods.moa",


)

_methods: dict[str, Method] = {}
_origin: dict[str, str] = {}
_loaded = False


class UnknownMethodError(KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class PluginError(ImportError):
    """A plugin that cannot be imported or registers nothing; the message says which and why."""


M = TypeVar("M", bound=type)


def register(cls: M) -> M:
    """Class decorator: put one instance of a ``Method`` subclass in the registry under ``cls.name``."""
    from harness.methods.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"@register expects a Method subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or not name.islower():
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__}: `name` must be a lower-case identifier "
            f"(letters, digits, underscores), got {name!r}"
        )
    origin = f"{cls.__module__}.{cls.__qualname__}"
    if name in _methods and _origin[name] != origin:
        raise ValueError(f"method name {name!r} is registered twice: by {_origin[name]} and by {origin}")
    _methods[name] = cls()
    _origin[name] = origin
    return cls


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = entry_point.load()
        except Exception as exc:
            raise PluginError(
                f"entry point {entry_point.name!r} = {entry_point.value!r} in group "
                f"{ENTRY_POINT_GROUP!r} failed to import: {type(exc).__name__}: {exc}"
            ) from exc
        _register_loaded(obj, f"entry point {entry_point.value!r}")


def _register_loaded(obj: object, where: str) -> None:
    from harness.methods.base import Method

    if (
        isinstance(obj, type)
        and issubclass(obj, Method)
        and obj.__dict__.get("name")
        and _methods.get(obj.name).__class__ is not obj
    ):
        register(obj)


def load_plugin(path: str) -> list[str]:
    """Import a plugin by ``module`` or ``module:Class`` path; return the names it registered."""
    module_name, _, attr = path.partition(":")
    _ensure_loaded()
    before = set(_methods)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise PluginError(
            f"plugin {path!r} could not be imported: {type(exc).__name__}: {exc}. "
            "Check the module path and that its package is installed or on PYTHONPATH."
        ) from exc
    if attr:
        try:
            obj = getattr(module, attr)
        except AttributeError as exc:
            raise PluginError(f"plugin {path!r}: module {module_name!r} has no {attr!r}") from exc
        _register_loaded(obj, path)
    added = sorted(set(_methods) - before)
    if not added and not any(_origin[n].startswith(module_name + ".") for n in _methods):
        raise PluginError(
            f"plugin {path!r} was imported but registered no method: decorate your Method "
            "subclass with @harness.methods.register"
        )
    return added or sorted(n for n in _methods if _origin[n].startswith(module_name + "."))


def get_method(name: str) -> Method:
    _ensure_loaded()
    try:
        return _methods[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method {name!r}; registered methods: {', '.join(sorted(_methods))}"
        ) from None


def all_methods() -> dict[str, Method]:
    _ensure_loaded()
    return dict(sorted(_methods.items()))


def origin(name: str) -> str:
    _ensure_loaded()
    return _origin[name]
