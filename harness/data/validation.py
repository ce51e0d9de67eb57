"""A validation split carved from the training items, for tuning (never the test items).

Per task, a seeded sample of ``round(fraction · n_label)`` items of every label is held out
(stratified by label, so each task keeps its label balance); the rest trains the tuning
runs. The same config gives the same split on every machine: the draw uses numpy's
``default_rng([seed, sha256(task)[:8]])`` on the items in file order.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


def validation_split(
    items: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(training items without the validation items, validation items)``, both in the
    original order. Raises ``ValueError`` when a task would keep no training item or give
    no validation item."""
    if not 0 < fraction < 1:
        raise ValueError(f"tune.validation_fraction = {fraction}: expected a number between 0 and 1")
    by_task: dict[str, dict[Any, list[int]]] = {}
    for i, item in enumerate(items):
        # a generation item has no label: its task is one stratum
        by_task.setdefault(item["task"], {}).setdefault(item.get("label"), []).append(i)
    held: set[int] = set()
    for task, by_label in by_task.items():
        rng = np.random.default_rng([seed, int(hashlib.sha256(task.encode()).hexdigest()[:8], 16)])
        chosen = []
        for label in sorted(by_label, key=str):
            indices = by_label[label]
            n = round(fraction * len(indices))
            chosen += [indices[j] for j in rng.permutation(len(indices))[:n]]
        total = sum(len(v) for v in by_label.values())
        if not chosen or len(chosen) == total:
            raise ValueError(
                f"tune.validation_fraction = {fraction} leaves task {task!r} ({total} training items) "
                f"with {'no validation' if not chosen else 'no training'} item; choose another fraction"
            )
        held.update(chosen)
    train = [it for i, it in enumerate(items) if i not in held]
    valid = [it for i, it in enumerate(items) if i in held]
    return train, valid
