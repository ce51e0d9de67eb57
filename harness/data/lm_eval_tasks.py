"""An lm-eval task folder for a suite's test items (the evaluator of record reads it).

:func:`write_task_folder` writes, for each task ``T`` of the test items::

    folder/{prefix}_{T}.yaml      one multiple_choice task, named {prefix}_{T}
    folder/data/{T}.jsonl         its docs, in item order
    folder/{prefix}_suite.yaml    the group over all tasks: mean acc and acc_norm, unweighted

The folder holds data only, no code: each task YAML says
``custom_dataset: !function harness.data.lm_eval_tasks.load_docs`` with
``dataset_kwargs: {file: data/T.jsonl}``; the loader is this module of the installed harness,
never a file in the folder (earlier versions wrote a ``suite_data.py`` there, which lm-eval
imported: an edited copy ran at the next scoring). lm-eval calls
``custom_dataset(**metadata, **dataset_kwargs)``, and ``metadata`` holds ``config_source``,
the path of the YAML being loaded, so :func:`load_docs` resolves ``file`` inside the YAML's
folder: the folder stays relocatable (lm-eval's own ``json`` loader would resolve a relative
``data_files`` against the working directory instead). The general-text task's detokenizer
and word/byte counts are lm-eval's own wikitext functions, called through this module too.

lm-eval resolves ``!function a.b.f`` by first looking for a file ``a/b.py`` next to the YAML,
so a folder could still plant code under that name, or a YAML could be edited to name
another function: :func:`verify_task_folder` refuses a folder holding any Python file, or a
YAML with an ``include`` or a ``!function`` other than this module's loaders, and the harness
calls it before every scoring.

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
from typing import TYPE_CHECKING, Any

import yaml

from harness.common.files import write_if_changed
from harness.common.metrics import metrics_for
from harness.data.generation import generation_task_files, is_generation, validate_generation_item
from harness.data.jsonl import dumps_jsonl, validate_item
from harness.data.prompts import LM_EVAL_DOC_TO_TEXT, TARGET_DELIMITER

if TYPE_CHECKING:
    import datasets

#: the module the task YAMLs' ``!function`` tags name (installed code, never the folder's)
LOADER_MODULE = "harness.data.lm_eval_tasks"
#: the functions a task YAML of this writer may name
LOADER_FUNCTIONS = ("load_docs", "load_general_text", "detokenize", "process_general_text")
#: the loader file earlier versions wrote into the folder (removed when the folder is rewritten)
OLD_LOADER = "suite_data.py"
#: files that Python (or lm-eval's ``!function``) could execute or import
_CODE_SUFFIXES = (".py", ".pyc", ".pyo", ".pyd", ".so", ".pth")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_DOC_FIELDS = ("question", "choices", "label", "task")

class TaskFolderError(ValueError):
    """A task folder that could make lm-eval run code that is not the installed harness's."""


# -- the loaders the task YAMLs name (run by lm-eval; installed code) ------------------------


def _data_file(file: Any, config_source: Any, loader: str) -> Path:
    """``file`` (relative, inside the folder of the YAML ``config_source``) as a path."""
    if not isinstance(file, str) or not file:
        raise ValueError(f"{LOADER_MODULE}.{loader} needs dataset_kwargs: {{file: data/<task>.jsonl}}, got {file!r}")
    if not config_source or config_source == "inline":
        raise ValueError(
            f"{LOADER_MODULE}.{loader}: lm-eval passed no YAML path (metadata config_source: "
            f"{config_source!r}); load the task from its YAML file (lm-eval >= 0.4.13)"
        )
    folder = Path(str(config_source)).parent.resolve()
    path = (folder / file).resolve()
    if Path(file).is_absolute() or not path.is_relative_to(folder):
        raise ValueError(f"{config_source}: data file {file!r} is outside the task folder {folder}")
    if not path.is_file():
        raise FileNotFoundError(f"{config_source}: no data file {path}")
    return path


def _rows(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def load_docs(file: str | None = None, config_source: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    import datasets  # only lm-eval calls this; at module level it cost every harness process 1.2 s
    """``DatasetDict({"test": ...})`` of a task's JSONL file (``file``, relative to the folder of
    the YAML lm-eval loads, ``config_source``), built in memory (no cache to go stale); other
    keyword arguments (lm-eval passes the task metadata and any model args) are ignored. The
    data step validated every line."""
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_rows(_data_file(file, config_source, "load_docs")))})


def load_general_text(file: str | None = None, config_source: str | None = None, **kwargs: Any) -> datasets.DatasetDict:
    import datasets  # see load_docs
    """The general-text documents as lm-eval's wikitext task reads them: ``page`` holds a
    document's text (the file's ``text`` field)."""
    rows = _rows(_data_file(file, config_source, "load_general_text"))
    pages = [{"page": row["text"], "title": row.get("page") or row.get("title") or ""} for row in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(pages)})


def detokenize(doc: dict[str, Any]) -> str:
    """lm-eval's own WikiText detokenizer (its wikitext task's ``doc_to_target``)."""
    # lm-eval's task package imports datasets: 1.4 s of every harness process's start if
    # imported at module level, and only lm-eval calls this
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer(doc)


def process_general_text(doc: dict[str, Any], results: Sequence[float]) -> dict[str, Any]:
    """lm-eval's own word and byte counts (its wikitext task's ``process_results``)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results  # see detokenize

    return process_results(doc, results)


# -- checking a folder before lm-eval reads it -------------------------------------------------


class _FunctionTag:
    def __init__(self, name: str):
        self.name = name


class _RecordingLoader(yaml.SafeLoader):
    """A safe YAML loader that keeps ``!function`` tags as names (never imports them)."""


_RecordingLoader.add_constructor("!function", lambda loader, node: _FunctionTag(loader.construct_scalar(node)))


def _functions(node: Any) -> list[str]:
    if isinstance(node, _FunctionTag):
        return [node.name]
    if isinstance(node, dict):
        return [f for v in node.values() for f in _functions(v)]
    if isinstance(node, list):
        return [f for v in node for f in _functions(v)]
    return []


def verify_task_folder(folder: str | Path) -> None:
    """Refuse (:class:`TaskFolderError`, naming the file) a task folder that would make lm-eval
    run anything but the installed harness's loaders: a Python file anywhere under it (lm-eval
    imports ``a/b.py`` next to a YAML for ``!function a.b.f`` before the installed module), a
    YAML it cannot read safely, a ``!function`` other than :data:`LOADER_FUNCTIONS` of
    :data:`LOADER_MODULE`, or an ``include`` (it would pull in a YAML from elsewhere). Reading
    the folder executes nothing."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TaskFolderError(f"{folder} is not a task folder (no such folder); rerun the data step")
    allowed = {f"{LOADER_MODULE}.{f}" for f in LOADER_FUNCTIONS}
    fix = (f"delete {folder} and rerun the data step (`python -m harness data --config <config>` or "
           "snakemake), which rewrites it")
    for path in sorted(folder.rglob("*")):
        if path.name.endswith(_CODE_SUFFIXES) or path.name == "__pycache__":
            raise TaskFolderError(
                f"{path}: a task folder holds no code, and lm-eval could import this file while "
                f"loading a task; never executed. {fix}"
            )
    for path in sorted(folder.rglob("*.yaml")) + sorted(folder.rglob("*.yml")):
        try:
            config = yaml.load(path.read_text(encoding="utf-8"), Loader=_RecordingLoader)  # a SafeLoader: builds no objects
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise TaskFolderError(f"{path}: not a task YAML the harness wrote ({exc}). {fix}") from None
        if not isinstance(config, dict):
            continue
        if "include" in config:
            raise TaskFolderError(f"{path}: includes {config['include']!r}; the harness's task YAMLs include nothing. {fix}")
        foreign = [f for f in _functions(config) if f not in allowed]
        if foreign:
            raise TaskFolderError(
                f"{path}: names !function {', '.join(foreign)}; a task YAML of the harness may name "
                f"only {', '.join(sorted(allowed))} (installed code). Never executed. {fix}"
            )


# -- the folder ----------------------------------------------------------------------------


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
        f"custom_dataset: !function {LOADER_MODULE}.load_docs\n"
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
        try:  # a generation item (an answer, no choices): harness.data.generation
            (validate_generation_item if is_generation(item) else validate_item)(item)
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
    files: dict[str, str] = {}
    files[f"{group_name(prefix)}.yaml"] = group_yaml(tasks, prefix, test_items)
    data_files = {}
    for task, items in by_task.items():
        data_files[task] = f"data/{task}.jsonl"
        if is_generation(items[0]):  # a generate_until task (harness.data.generation)
            files |= generation_task_files(task, task_name(task, prefix), folder, items)
            continue
        files[f"{task_name(task, prefix)}.yaml"] = task_yaml(task, prefix, items)
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
    # the loader earlier versions wrote next to the YAMLs (and lm-eval's compiled copies of it)
    stale += [folder / OLD_LOADER] if (folder / OLD_LOADER).exists() else []
    stale += list((folder / "__pycache__").glob(OLD_LOADER.removesuffix(".py") + ".*.pyc"))
    for p in stale:
        p.unlink()
    if (folder / "__pycache__").is_dir() and not any((folder / "__pycache__").iterdir()):
        (folder / "__pycache__").rmdir()
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
