"""Metrics computed from a run's stored samples (``samples.json``), one module each.

Each module defines its metric with :func:`harness.common.metrics.register_metric` on the
function that computes it; importing this package imports every module in it, so adding a
metric is adding one file here (and its test). The results reader
(:func:`harness.analysis.results.collect_results`) computes every registered one for every
run folder that holds stored samples: the summary, the main table (a metric declared with
``main_table=True``) and, for a per-item metric, the significance table of the other metrics
pick it up. Runs evaluated before samples were kept have none of these metrics.
"""

from __future__ import annotations

import importlib
import pkgutil

#: the modules found here, each imported once
MODULES = tuple(
    importlib.import_module(f"{__name__}.{info.name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name)
    if not info.name.startswith("_")
)
