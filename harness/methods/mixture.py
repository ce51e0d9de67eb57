"""Deprecated: use :mod:`harness.adapters.mixture` (this alias goes away in the next release)."""

import warnings

from harness.adapters.mixture import *  # noqa: F403

warnings.warn(
    "`harness.methods.mixture` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.mixture` instead",
    DeprecationWarning,
    stacklevel=2,
)
