"""Deprecated: use :mod:`harness.adapters.grid` (this alias goes away in the next release)."""

import warnings

from harness.adapters.grid import *  # noqa: F403

warnings.warn(
    "`harness.methods.grid` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.grid` instead",
    DeprecationWarning,
    stacklevel=2,
)
