"""Deprecated: use :mod:`harness.adapters.core` (this alias goes away in the next release)."""

import warnings

from harness.adapters.core import *  # noqa: F403

warnings.warn(
    "`harness.methods.core` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.core` instead",
    DeprecationWarning,
    stacklevel=2,
)
