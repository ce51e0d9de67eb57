"""Deprecated: use :mod:`harness.adapters.errors` (this alias goes away in the next release)."""

import warnings

from harness.adapters.errors import *  # noqa: F403

warnings.warn(
    "`harness.methods.errors` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.errors` instead",
    DeprecationWarning,
    stacklevel=2,
)
