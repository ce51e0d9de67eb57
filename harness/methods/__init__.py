"""Deprecated location (until the next release): the adapter toolkit moved to
:mod:`harness.adapters` and the built-in methods to the top-level :mod:`methods` package.

``from harness.methods import BlockMixtureLayer`` (and every other toolkit name) and the
old toolkit submodules (``harness.methods.routing``, ``harness.methods.mixture``,
``harness.methods.base``, ``core``, ``grid``, ``inject``, ``registry``, ``components``,
``errors``) still work, with a ``DeprecationWarning`` that names the new import path. The
built-in methods themselves are imported from :mod:`methods` (``methods.smora``).
"""

from __future__ import annotations

import warnings

import harness.adapters as _adapters


def __getattr__(name: str):
    if name in _adapters.__all__:
        warnings.warn(
            f"`harness.methods.{name}` is deprecated and will be removed in the next release: "
            f"use `from harness.adapters import {name}`",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_adapters, name)
    raise AttributeError(f"module 'harness.methods' has no attribute {name!r}")
