"""Training items from lm-eval tasks (``data.source: lm_eval``), rendered by lm-eval itself.

For each named multiple-choice task, every doc of its train split (or a seeded
subset of ``per_task`` docs) becomes one training item. The strings come from
lm-eval's own machinery, not from a private template: the zero-shot context is
``task.fewshot_context(doc, 0)`` and the (context, continuation) pairs are those of
``task.construct_requests``, i.e. ``doc_to_text`` / ``doc_to_choice`` /
``doc_to_target`` and the task's ``target_delimiter``, exactly what lm-eval scores
on the task's evaluation split. Multiple-input tasks (WinoGrande: one context per
option, a shared continuation) are handled the way lm-eval scores them.

Each item is a valid harness item plus the exact strings training uses::

    {"task": "arc_easy", "question": <context of the gold answer>,
     "choices": <doc_to_choice(doc)>, "label": <gold index>,
     "context": <context of the gold answer>, "continuation": <target_delimiter + gold>,
     "doc_id": <index in the split>}

(:func:`harness.data.prompts.training_texts` returns ``context`` and ``continuation``).

Tasks are looked up with ``TaskManager(include_path=...)``. When every task is found
in ``include_path`` the registry's own ~15k YAML files are not indexed (seconds
instead of half a minute, and what the offline tests use); otherwise registry tasks
and ``include_path`` tasks can be mixed. Registry tasks download their datasets
through ``datasets`` on first use (the data rule); with ``HF_DATASETS_OFFLINE=1`` they
are read from the local Hugging Face cache.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.data.jsonl import DataError

SPLITS = ("train", "validation", "test")


def task_manager(tasks: Sequence[str], include_path: str | Path | None = None):
    """A TaskManager that knows ``tasks``: only ``include_path`` when it holds them all,
    the registry (plus ``include_path``) otherwise."""
    from lm_eval.tasks import TaskManager

    path = None if include_path is None else str(include_path)
    if path is not None:
        if not Path(path).is_dir():
            raise DataError(f"data.include_path {path!r} is not a folder of lm-eval task YAMLs")
        local = TaskManager(include_path=path, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    return TaskManager(include_path=path, include_defaults=True)


def _docs(task, name: str, split: str):
    has, get = {
        "train": (task.has_training_docs, task.training_docs),
        "validation": (task.has_validation_docs, task.validation_docs),
        "test": (task.has_test_docs, task.test_docs),
    }[split]
    if not has():
        splits = [s for s, h in (("train", task.has_training_docs), ("validation", task.has_validation_docs),
                                 ("test", task.has_test_docs)) if h()]
        raise DataError(
            f"lm-eval task {name!r} has no {split} split (its splits: {', '.join(splits) or 'none'}); "
            f"data.source lm_eval trains on each task's {split} split, so pick tasks that have one"
        )
    return get()


def _gold_index(task, doc: dict, choices: list[str], name: str, doc_id: int) -> int:
    """The correct choice's index, as lm-eval's ``process_results`` finds it."""
    gold = task.doc_to_text(doc) if task.multiple_input else task.doc_to_target(doc)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else (int(gold) if gold.isdigit() else -1)
    if isinstance(gold, list) or not isinstance(gold, int) or not 0 <= gold < len(choices):
        raise DataError(
            f"lm-eval task {name!r}, doc {doc_id}: no single gold choice ({gold!r} for "
            f"{len(choices)} choices); only single-answer multiple-choice tasks can train"
        )
    return gold


def _sample(n: int, cap: int | None, seed: int, name: str) -> list[int]:
    if cap is None or n <= cap:
        return list(range(n))
    import numpy as np

    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return sorted(int(i) for i in rng.choice(n, size=cap, replace=False))


def render_items(task, name: str, split: str = "train", per_task: int | None = None,
                 seed: int = 1234) -> list[dict[str, Any]]:
    """The items of one lm-eval task's split (see the module docstring)."""
    if task.OUTPUT_TYPE != "multiple_choice":
        raise DataError(
            f"lm-eval task {name!r} has output_type {task.OUTPUT_TYPE!r}; data.source lm_eval "
            "trains on multiple_choice tasks only"
        )
    docs = _docs(task, name, split)
    items = []
    for doc_id in _sample(len(docs), per_task, seed, name):
        doc = docs[doc_id]
        ctx = task.fewshot_context(doc, 0)
        requests = task.construct_requests(doc=doc, ctx=ctx, metadata=(name, doc_id, 1))
        pairs = [inst.arguments[:2] for inst in requests]
        choices = [str(c) for c in task.doc_to_choice(doc)]
        gold = _gold_index(task, doc, choices, name, doc_id)
        context, cont = pairs[gold]
        items.append(
            {
                "task": name,
                "question": context,
                "choices": choices,
                "label": gold,
                "context": context,
                "continuation": cont,
                "doc_id": doc_id,
            }
        )
    return items


def load_lm_eval_items(
    tasks: Sequence[str],
    include_path: str | Path | None = None,
    split: str = "train",
    per_task: int | None = None,
    seed: int = 1234,
) -> list[dict[str, Any]]:
    """Items of ``split`` for every task in ``tasks`` (task by task, docs in split order;
    ``per_task`` keeps a seeded random subset of that many docs per task)."""
    from lm_eval.tasks import get_task_dict

    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if isinstance(tasks, str) or not list(tasks):
        raise DataError(f"data.tasks must be a non-empty list of lm-eval task names, got {tasks!r}")
    tasks = list(tasks)
    manager = task_manager(tasks, include_path)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise DataError(
            f"data.tasks names {', '.join(map(repr, unknown))}, which lm-eval does not know"
            + (f" (looked in the registry and {include_path})" if include_path else " (registry)")
            + "; `lm-eval ls tasks` lists the registry"
        )
    task_dict = get_task_dict(tasks, manager)
    items: list[dict[str, Any]] = []
    for name in tasks:
        task = task_dict.get(name)
        if task is None or isinstance(task, dict):
            raise DataError(
                f"data.tasks entry {name!r} is an lm-eval group or tag, not one task; list its tasks"
            )
        items += render_items(task, name, split, per_task, seed)
    return items
