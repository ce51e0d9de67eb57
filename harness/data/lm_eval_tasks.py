"""An lm-eval task folder for a suite's test items (the evaluator of record reads it).

:func:`write_task_folder` writes, for each task ``T`` of the test items::

    folder/{prefix}_{T}.yaml      one multiple_choice task, named {prefix}_{T}
    folder/data/{T}.jsonl         its docs, in item order
    folder/{prefix}_suite.yaml    the group over all tasks: mean acc and acc_norm, unweighted
    folder/suite_data.py          the loader the task YAMLs call

The folder is self-contained and relocatable: each task YAML says
``custom_dataset: !function suite_data.load`` with ``dataset_kwargs: {file: data/T.jsonl}``
and ``suite_data.load`` resolves that file next to its own ``__file__``. lm-eval
calls ``custom_dataset(**metadata, **dataset_kwargs)`` (``metadata`` holds the
YAML's ``metadata`` plus the TaskManager's or, from ``simple_evaluate`` without a
task manager, the model args), so the loader accepts and ignores unknown keys.

Use it with ``TaskManager(include_path=str(folder), include_defaults=False)``
(``include_defaults=True`` to add registry tasks) and load ``{prefix}_suite``.
Note that lm-eval indexes every ``*.yaml`` under the folder (recursively) and
silently skips YAML files it cannot parse, so nothing else should live there.
Every file is written atomically and only when its content changed; files of
tasks that are no longer in the suite are removed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.common.files import write_if_changed
from harness.common.metrics import metrics_for
from harness.data.jsonl import dumps_jsonl, validate_item
from harness.data.prompts import LM_EVAL_DOC_TO_TEXT, TARGET_DELIMITER

LOADER_MODULE = "suite_data"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DOC_FIELDS = ("question", "choices", "label", "task")

LOADER_SOURCE = '''\
"""Loads one task's docs for lm-eval (written by harness.data.lm_eval_tasks; do not edit).

The task YAMLs next to this file say ``custom_dataset: !function suite_data.load``
and ``dataset_kwargs: {file: data/<task>.jsonl}``; the file is resolved relative to
this folder, so the folder can be moved or copied as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(file=None, **kwargs):
    """``datasets.DatasetDict({"test": ...})`` of a JSONL file, built in memory (no cache
    to go stale, no builder set-up per task); other kwargs (lm-eval passes the task
    metadata and any model args) are ignored. The data step validated every line."""
    import datasets

    if not file:
        raise ValueError("suite_data.load needs dataset_kwargs: {file: data/<task>.jsonl}")
    path = Path(file)
    if not path.is_absolute():
        path = HERE / path
    if not path.is_file():
        raise FileNotFoundError(f"suite_data.load: no data file {path}")
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    test = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict({"test": test})


def load_general_text(file=None, **kwargs):
    """The general-text documents as lm-eval's wikitext task reads them: ``page`` holds a
    document's text (the file's ``text`` field)."""
    import datasets

    path = HERE / file
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    pages = [{"page": row["text"], "title": row.get("page") or row.get("title") or ""} for row in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(pages)})


def detokenize(doc):
    """lm-eval's own WikiText detokenizer (its wikitext task's ``doc_to_target``)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer(doc)


def process_general_text(doc, results):
    """lm-eval's own word and byte counts (its wikitext task's ``process_results``)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)
'''


def group_name(prefix: str = "moelora") -> str:
    return f"{prefix}_suite"


def task_name(task: str, prefix: str = "moelora") -> str:
    return f"{prefix}_{task}"


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text, ensure_ascii=False)


#: the name of the general-text task (not part of the suite group)
GENERAL_TEXT = "general_text"


def general_text_yaml(prefix: str = "moelora") -> str:
    """The YAML text of the general-text task: lm-eval's ``loglikelihood_rolling`` over each
    document, as its ``wikitext`` task (the same detokenizer and word/byte counts)."""
    return (
        "# Written by harness.data.lm_eval_tasks (do not edit: the data step rewrites it).\n"
        f"task: {task_name(GENERAL_TEXT, prefix)}\n"
        f"task_alias: {GENERAL_TEXT}\n"
        f"custom_dataset: !function {LOADER_MODULE}.load_general_text\n"
        "dataset_kwargs:\n"
        f"  file: data/{GENERAL_TEXT}.jsonl\n"
        "output_type: loglikelihood_rolling\n"
        "test_split: test\n"
        'doc_to_text: ""\n'
        f"doc_to_target: !function {LOADER_MODULE}.detokenize\n"
        f"process_results: !function {LOADER_MODULE}.process_general_text\n"
        "metric_list:\n"
        "  - metric: word_perplexity\n"
        "  - metric: byte_perplexity\n"
        "  - metric: bits_per_byte\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def _metric_list(metrics, key: str = "higher_is_better") -> list[str]:
    lines = []
    for m in metrics:
        lines.append(f"  - metric: {m.name}")
        lines.append(f"    aggregation: {m.aggregation}")
        if key == "higher_is_better":
            lines.append(f"    higher_is_better: {str(bool(m.higher_is_better)).lower()}")
        else:
            lines.append("    weight_by_size: false")
    return lines


def task_yaml(task: str, prefix: str = "moelora", items: Sequence[dict[str, Any]] | None = None) -> str:
    """The YAML text of one suite task; its ``metric_list`` holds every registered task metric
    that applies to its items (:func:`harness.common.metrics.metrics_for`)."""
    metrics = metrics_for(items if items is not None else [])
    return (
        "# Written by harness.data.lm_eval_tasks (do not edit: the data step rewrites it).\n"
        f"task: {task_name(task, prefix)}\n"
        f"task_alias: {task}\n"
        f"custom_dataset: !function {LOADER_MODULE}.load\n"
        "dataset_kwargs:\n"
        f"  file: data/{task}.jsonl\n"
        "output_type: multiple_choice\n"
        "test_split: test\n"
        f"doc_to_text: {_q(LM_EVAL_DOC_TO_TEXT)}\n"
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        f"target_delimiter: {_q(TARGET_DELIMITER)}\n"
        "metric_list:\n"
        + "".join(line + "\n" for line in _metric_list(metrics))
        + "metadata:\n"
        "  version: 1.0\n"
    )


def group_yaml(
    tasks: Sequence[str], prefix: str = "moelora", items: Sequence[dict[str, Any]] | None = None
) -> str:
    """The YAML text of the group over ``tasks``: the mean of each binary metric every task
    reports (acc, acc_norm), each task weighted equally."""
    by_task: dict[str, list] = {}
    for it in items or []:
        by_task.setdefault(it["task"], []).append(it)
    shared = [m for m in metrics_for([]) if m.binary and all(
        m in metrics_for(by_task.get(t, [])) for t in tasks)]
    lines = [
        "# Written by harness.data.lm_eval_tasks (do not edit: the data step rewrites it).",
        f"group: {group_name(prefix)}",
        "task:",
        *(f"  - {task_name(t, prefix)}" for t in tasks),
        "aggregate_metric_list:",
        *_metric_list(shared, key="weight_by_size"),
        "metadata:",
        "  version: 1.0",
    ]
    return "\n".join(lines) + "\n"


def _check_name(kind: str, name: Any) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ValueError(
            f"{kind} name {name!r} cannot name an lm-eval task file "
            "(valid: letters, digits, '_' and '-', starting with a letter or digit)"
        )


def write_task_folder(
    test_items: list[dict[str, Any]],
    folder: Path,
    prefix: str = "moelora",
    general_text: str | Path | None = None,
) -> dict[str, Any]:
    """Write the task folder for ``test_items`` (grouped by their ``task`` field, tasks
    in order of first appearance, docs in item order). Returns
    ``{"group", "tasks" (lm-eval names), "suite_tasks", "folder", "data_files"
    (task -> path relative to the folder), "written" (paths that changed)}``."""
    folder = Path(folder)
    _check_name("prefix", prefix)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for i, item in enumerate(test_items):
        if "task" not in item:
            raise ValueError(
                f"test item {i} has no 'task' field (needed to group items into tasks)"
            )
        try:
            validate_item(item)
        except ValueError as e:
            raise ValueError(f"test item {i} (task {item['task']!r}): {e}") from None
        by_task.setdefault(item["task"], []).append(item)
    if not by_task:
        raise ValueError("no test items: an lm-eval task needs at least one doc")
    for task in by_task:
        _check_name("task", task)
        if task_name(task, prefix) == group_name(prefix):
            raise ValueError(
                f"task name {task!r} would give the task the group's name {group_name(prefix)!r}; "
                "rename the task"
            )

    tasks = list(by_task)
    files: dict[str, str] = {LOADER_MODULE + ".py": LOADER_SOURCE}
    files[f"{group_name(prefix)}.yaml"] = group_yaml(tasks, prefix, test_items)
    data_files = {}
    for task, items in by_task.items():
        files[f"{task_name(task, prefix)}.yaml"] = task_yaml(task, prefix, items)
        data_files[task] = f"data/{task}.jsonl"
        files[data_files[task]] = dumps_jsonl(
            {
                **{k: it[k] for k in _DOC_FIELDS},
                **{k: v for k, v in it.items() if k not in _DOC_FIELDS},
            }
            for it in items
        )

    if general_text is not None:
        if GENERAL_TEXT in by_task:
            raise ValueError(f"task name {GENERAL_TEXT!r} is reserved for eval.general_text; rename the task")
        files[f"{task_name(GENERAL_TEXT, prefix)}.yaml"] = general_text_yaml(prefix)
        files[f"data/{GENERAL_TEXT}.jsonl"] = Path(general_text).read_text(encoding="utf-8")

    # Remove what an earlier suite left behind (only files of this writer's naming).
    stale = [p for p in folder.glob(f"{prefix}_*.yaml") if p.name not in files]
    stale += [p for p in (folder / "data").glob("*.jsonl") if f"data/{p.name}" not in files]
    for p in stale:
        p.unlink()
    written = [rel for rel, text in files.items() if write_if_changed(folder / rel, text)]
    return {
        "group": group_name(prefix),
        "tasks": [task_name(t, prefix) for t in tasks],
        "suite_tasks": tasks,
        "folder": str(folder),
        "data_files": data_files,
        "general_text": task_name(GENERAL_TEXT, prefix) if general_text is not None else None,
        "written": written,
    }
