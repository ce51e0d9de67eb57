"""Deprecated: use :mod:`harness.adapters.routing` (this alias goes away in the next release)."""

import warnings

from harness.adapters.routing import *  # noqa: F403

warnings.warn(
    "`harness.methods.routing` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.routing` instead",
    DeprecationWarning,
    stacklevel=2,
)
