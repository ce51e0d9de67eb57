"""What a study's training data holds, known before the data step runs: its task names, its
items (with where each comes from) and content digests.

Methods that need the task names (e.g. one adapter per task) get them through
:class:`harness.adapters.PlanContext`; they never see the data config. Run ids hash the
digest of the training items a run reads (all of them for a joint run, its own tasks' for
a component), so an edited line reruns exactly the runs that read it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from harness.data.jsonl import DataError
from harness.data.sources import FILE_SOURCES, HUB_SOURCE, read_items
from harness.data.suite import resolve_tasks, suite_from_config


def training_task_names(data_cfg: dict[str, Any]) -> tuple[str, ...]:
    """The tasks of the training data, in the data's order (``data.tasks`` when set)."""
    source = data_cfg["source"]
    if data_cfg.get("tasks"):
        return tuple(data_cfg["tasks"])
    if source == "generated":
        return tuple(resolve_tasks(None))
    if source not in (*FILE_SOURCES, HUB_SOURCE):
        return ()
    return tuple(dict.fromkeys(item["task"] for _, item in training_items(data_cfg)))


def _selected(data_cfg: dict[str, Any], split: str) -> list[tuple[str, dict[str, Any]]]:
    """A files or hub source's items of one split (:func:`harness.data.sources.read_items`),
    only those of ``data.tasks`` when set."""
    tasks = data_cfg.get("tasks")
    return [(where, item) for where, item in read_items(data_cfg, split) if tasks is None or item["task"] in tasks]


def training_items(data_cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, item)`` for every training item the data step will write (``where``: the
    file and line or row, or ``generated item N``); ``data.tasks`` selects. Not for lm-eval sources
    (their items come from the hub when the data step runs)."""
    source = data_cfg["source"]
    if source == "generated":
        suite = suite_from_config(data_cfg)
        return [(f"generated item {i}", item) for i, item in enumerate(suite["train"])]
    if source in (*FILE_SOURCES, HUB_SOURCE):
        return _selected(data_cfg, "train")
    raise DataError(f"the training items of data.source {source!r} are known only after the data step")


def test_items(data_cfg: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``(where, item)`` for every test item (generated, files or hub sources)."""
    source = data_cfg["source"]
    if source == "generated":
        suite = suite_from_config(data_cfg)
        return [(f"generated test item {i}", item) for i, item in enumerate(suite["test"])]
    if source in (*FILE_SOURCES, HUB_SOURCE):
        return _selected(data_cfg, "test")
    raise DataError(f"the test items of data.source {source!r} are lm-eval's own")


def _digest(items: list[dict[str, Any]]) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(json.dumps(item, sort_keys=True, ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def task_digests(items: list[tuple[str, dict[str, Any]]]) -> dict[str, str]:
    """Task -> sha256 of its items (in file order)."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for _, item in items:
        by_task.setdefault(item["task"], []).append(item)
    return {task: _digest(group) for task, group in by_task.items()}


def content_digest(digests: dict[str, str], tasks: list[str] | tuple[str, ...] | None = None) -> str:
    """One digest over the given tasks' digests (all tasks when ``tasks`` is None)."""
    chosen = digests if tasks is None else {t: digests[t] for t in tasks if t in digests}
    return hashlib.sha256(json.dumps(chosen, sort_keys=True).encode()).hexdigest()[:16]


def training_data_digest(data_cfg: dict[str, Any]) -> str:
    """A digest of every training item (lm-eval sources: of the data config)."""
    if data_cfg["source"] == "lm_eval":
        return hashlib.sha256(json.dumps(data_cfg, sort_keys=True).encode()).hexdigest()[:16]
    return content_digest(task_digests(training_items(data_cfg)))


def test_data_digest(config: dict[str, Any]) -> str | None:
    """A digest of the test items the evaluation reads, and of the general text it scores
    (``eval.general_text``; ``None``: lm-eval's own splits)."""
    if config["data"]["source"] == "lm_eval":
        return None
    digests = task_digests(test_items(config["data"]))
    general = (config.get("eval") or {}).get("general_text")
    if general:
        digests["(general text)"] = hashlib.sha256(Path(general).read_bytes()).hexdigest()
    return content_digest(digests)
