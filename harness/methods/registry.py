"""Deprecated: use :mod:`harness.adapters.registry` (this alias goes away in the next release)."""

import warnings

from harness.adapters.registry import *  # noqa: F403

warnings.warn(
    "`harness.methods.registry` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.registry` instead",
    DeprecationWarning,
    stacklevel=2,
)
