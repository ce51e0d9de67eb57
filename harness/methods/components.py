"""Deprecated: use :mod:`harness.adapters.components` (this alias goes away in the next release)."""

import warnings

from harness.adapters.components import *  # noqa: F403

warnings.warn(
    "`harness.methods.components` is deprecated and will be removed in the next release: "
    "import from `harness.adapters.components` instead",
    DeprecationWarning,
    stacklevel=2,
)
