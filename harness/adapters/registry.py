"""The method registry: one name -> ``"module:Class"`` table, loaded lazily.

Where names come from, in order:

* the built-in plugin package (:data:`BUILTIN_PACKAGE`, the repository's ``methods/``),
  whose ``METHODS`` table maps each name to ``"module:Class"``;
* installed packages, through the ``harness.methods`` entry-point group
  (``name = "module:Class"`` or ``name = "module"``);
* plugins by import path written in a study config (``plugins: [my_pkg.my_method]``),
  imported at once: their :func:`register` decorators add them.

A module is imported only when one of its names is asked for (``python -m harness
methods`` imports them all). An unknown name is refused with the registered names and
a "did you mean" for a near miss.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import inspect
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from harness.adapters.errors import PluginError, UnknownMethodError

if TYPE_CHECKING:
    from harness.adapters.base import Method

ENTRY_POINT_GROUP = "harness.methods"
#: the package of built-in method plugins; its ``METHODS`` table names them
BUILTIN_PACKAGE = "methods"

_methods: dict[str, Method] = {}
_origin: dict[str, str] = {}
_table: dict[str, str] | None = None  # name -> "module:Class" (not yet imported)

M = TypeVar("M", bound=type)


def register(cls: M) -> M:
    """Class decorator: put one instance of a ``Method`` subclass in the registry under ``cls.name``."""
    from harness.adapters.base import Method

    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"@register expects a Method subclass, got {cls!r}")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.replace("_", "").isalnum() or not name.islower():
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__}: `name` must be a lower-case identifier "
            f"(letters, digits, underscores), got {name!r}"
        )
    origin = f"{cls.__module__}.{cls.__qualname__}"
    if name in _methods and _origin[name] != origin and not _same_source(type(_methods[name]), cls):
        raise ValueError(f"method name {name!r} is registered twice: by {_origin[name]} and by {origin}")
    _methods[name] = cls()
    _origin[name] = origin
    return cls


def _same_source(a: type, b: type) -> bool:
    """One plugin file imported under two module names (``frozen_router`` and
    ``examples.frozen_router``) registers the same method, not two."""
    try:
        return a.__qualname__ == b.__qualname__ and inspect.getsourcefile(a) == inspect.getsourcefile(b)
    except TypeError:
        return False


def _lazy_table() -> dict[str, str]:
    """Built-in and entry-point names -> their import targets (nothing imported yet)."""
    global _table
    if _table is None:
        table: dict[str, str] = {}
        try:
            builtin = importlib.import_module(BUILTIN_PACKAGE)
            table.update(getattr(builtin, "METHODS", {}))
        except ModuleNotFoundError as exc:
            if exc.name != BUILTIN_PACKAGE:
                raise
        for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            table.setdefault(entry_point.name, entry_point.value)
        _table = table
    return _table


def _import_target(name: str, target: str) -> None:
    module_name, _, attr = target.partition(":")
    where = f"method {name!r} ({target!r})"
    module = _import_module(module_name, where)
    if attr:
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise PluginError(f"{where}: module {module_name!r} has no {attr!r}") from None
        _register_loaded(obj)
    if name not in _methods:
        raise PluginError(
            f"{where} was imported but registered no method of that name: decorate the "
            "Method subclass with @harness.adapters.register and set its `name`"
        )


def _import_module(module_name: str, where: str):
    """Import a plugin module; a plugin's own bug is reported with its file and line."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise PluginError(
                f"{where}: no module named {exc.name!r}. Check the module path and that its "
                "package is installed or on PYTHONPATH (the study's folder is on it)."
            ) from None
        raise PluginError(_plugin_bug(where, exc)) from exc
    except Exception as exc:
        raise PluginError(_plugin_bug(where, exc)) from exc


def _plugin_bug(where: str, exc: BaseException) -> str:
    """``where`` failed while importing: the plugin's deepest frame outside the standard
    library and this package, and the exception."""
    frames = traceback.extract_tb(exc.__traceback__)
    own = [f for f in frames if "importlib" not in f.filename and "/harness/adapters/" not in f.filename]
    frame = own[-1] if own else (frames[-1] if frames else None)
    at = f" at {frame.filename}:{frame.lineno} ({frame.line})" if frame else ""
    return f"{where} raised {type(exc).__name__}: {exc}{at} while being imported"


def _register_loaded(obj: object) -> None:
    from harness.adapters.base import Method

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
    if module_name.startswith(".") or "/" in path or "\\" in path or ".." in module_name:
        # importlib would fail on it as if the plugin had a bug; it is a path, not a module
        raise PluginError(
            f"plugin {path!r} is a file path or a relative import, not a module's import path: "
            "plugins are imported by dotted name (e.g. my_lab.frozen_router) from the study's "
            "folder, PYTHONPATH or an installed package, never from a path that could reach "
            "outside them"
        )
    before = set(_methods)
    module = _import_module(module_name, f"plugin {path!r}")
    if attr:
        try:
            obj = getattr(module, attr)
        except AttributeError:
            raise PluginError(f"plugin {path!r}: module {module_name!r} has no {attr!r}") from None
        _register_loaded(obj)
    added = sorted(set(_methods) - before)
    mine = sorted(n for n in _methods if _defined_in(n, module))
    if not added and not mine:
        raise PluginError(
            f"plugin {path!r} was imported but registered no method: decorate your Method "
            "subclass with @harness.adapters.register"
        )
    return added or mine


def _defined_in(name: str, module) -> bool:
    """Whether method ``name`` comes from ``module``'s file (also when that file was first
    imported under another module name, e.g. ``frozen_router`` and ``examples.frozen_router``)."""
    if _origin[name].startswith(module.__name__ + "."):
        return True
    try:
        source = inspect.getsourcefile(type(_methods[name]))
    except TypeError:
        return False
    return source is not None and getattr(module, "__file__", None) is not None and (
        Path(source).resolve() == Path(module.__file__).resolve()
    )


def get_method(name: str) -> Method:
    """The registered method ``name``, importing its module on first use."""
    if name in _methods:
        return _methods[name]
    table = _lazy_table()
    if name in table:
        _import_target(name, table[name])
        return _methods[name]
    known = sorted(set(_methods) | set(table))
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownMethodError(
        f"unknown method {name!r}{hint}. Registered methods: {', '.join(known)}. A plugin is "
        "loaded by its import path in the config's `plugins:` list or by an entry point in "
        f"the {ENTRY_POINT_GROUP!r} group."
    )


def all_methods() -> dict[str, Method]:
    """Every registered method, sorted by name (imports every built-in and entry-point module)."""
    for name, target in _lazy_table().items():
        if name not in _methods:
            _import_target(name, target)
    return dict(sorted(_methods.items()))


def reference_method() -> Method:
    """The method the study compares everything with (``is_reference``: peft's LoRA)."""
    for method in all_methods().values():
        if method.is_reference:
            return method
    raise UnknownMethodError("no registered method is marked `is_reference` (the LoRA baseline)")


def origin(name: str) -> str:
    get_method(name)
    return _origin[name]


def is_builtin(name: str) -> bool:
    return origin(name).startswith(BUILTIN_PACKAGE + ".")
