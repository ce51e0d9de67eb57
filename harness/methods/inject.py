"""Deprecated: use :mod:`harness.adapters.inject` (this alias goes away in the next release)."""

import warnings

from harness.adapters.inject import *  # noqa: F403

warnings.warn(
    "`harness.methods.inject` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.inject` instead",
    DeprecationWarning,
    stacklevel=2,
)
