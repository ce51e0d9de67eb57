"""The task names of a study's training data, known before the data step runs.

Methods that need them (e.g. one adapter per task) get them through
:class:`harness.adapters.PlanContext`; they never see the data config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.data.jsonl import DataError
from harness.data.suite import resolve_tasks


def training_task_names(data_cfg: dict[str, Any]) -> tuple[str, ...]:
    """The tasks of the training data, in the data's order (``data.tasks`` when set)."""
    source = data_cfg["source"]
    if data_cfg.get("tasks"):
        return tuple(data_cfg["tasks"])
    if source == "generated":
        return tuple(resolve_tasks(None))
    if source != "jsonl":
        return ()
    train, test = Path(data_cfg["train"]), Path(data_cfg["test"])
    if not train.is_file():
        raise DataError(f"{train}: file not found (data.train)")
    tasks: dict[str, None] = {}
    with open(train, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except ValueError as exc:
                raise DataError(f"{train}:{number}: not valid JSON ({exc.args[0]})") from None
            task = item.get("task", test.stem) if isinstance(item, dict) else test.stem
            tasks.setdefault(str(task), None)
    return tuple(tasks)
