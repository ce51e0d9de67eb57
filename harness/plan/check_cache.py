"""The checks' verdicts kept on disk (``<cache>/checks/<kind>-<digest>.json``), keyed by what
they read, so a check is computed once per input (the one implementation: the checks of
:mod:`harness.plan.checks` and :mod:`harness.plan.eval_data` use it).

Parsing the Snakefile plans and writes nothing: it runs the checks inside
:func:`deferred_cache`, which keeps new verdicts in memory; a real run's ``onstart`` writes
them (:func:`write_deferred_cache`), a dry run never does. ``python -m harness check`` and
the jobs write them at once. A file that does not read back as JSON is computed again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.common.files import atomic_write_json
from harness.model.load import cache_root

#: verdicts computed while writing is deferred, not yet on disk
_PENDING: dict[Path, Any] = {}
_DEFER = False


def cache_file(config: dict[str, Any], kind: str, key: Any) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_root(config) / "checks" / f"{kind}-{digest}.json"


def read_verdict(path: Path) -> Any:
    """The stored (or pending) verdict, ``None`` when there is none or it is unreadable."""
    if path in _PENDING:
        return _PENDING[path]
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_verdict(path: Path, value: Any) -> None:
    if _DEFER:
        _PENDING[path] = value
    else:
        atomic_write_json(path, value)


def cached(config: dict[str, Any], kind: str, key: Any, compute):
    """``compute()`` once per ``key`` (a JSON-able value)."""
    path = cache_file(config, kind, key)
    value = read_verdict(path)
    if value is None:
        value = compute()
        write_verdict(path, value)
    return value


@contextmanager
def deferred_cache() -> Iterator[None]:
    """Compute checks without writing their verdicts (they wait for :func:`write_deferred_cache`)."""
    global _DEFER
    before, _DEFER = _DEFER, True
    try:
        yield
    finally:
        _DEFER = before


def write_deferred_cache() -> None:
    """Write the verdicts computed under :func:`deferred_cache`."""
    while _PENDING:
        path, value = _PENDING.popitem()
        atomic_write_json(path, value)
