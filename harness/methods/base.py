"""Deprecated: use :mod:`harness.adapters.base` (this alias goes away in the next release)."""

import warnings

from harness.adapters.base import *  # noqa: F403

warnings.warn(
    "`harness.methods.base` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.base` instead",
    DeprecationWarning,
    stacklevel=2,
)
