"""Local and ``datasets`` data in the shapes researchers have, read into harness items.

A study's ``data`` section names where its items come from::

    source: jsonl | files      train, test: a .jsonl/.json, .csv or .parquet file, or a
                               folder written by ``datasets``' ``save_to_disk`` (one split;
                               a DatasetDict's split is its sub-folder, ``folder/train``)
    source: hub                dataset: a Hugging Face dataset id (or a local dataset folder),
                               subset: its config name (optional), train / test: split names
                               (default train / test); read with ``datasets.load_dataset``,
                               so ``HF_DATASETS_OFFLINE=1`` reads the local cache only
    fields: {question: ..., choices: ..., label: ..., answer: ..., task: ...}   (optional)

``fields`` maps the harness's names to the data's own; each defaults to the harness's name.
``choices`` names one field holding the list of choices, or a list of fields holding one
choice each (``[A, B, C, D]``). A row becomes one item of one of two kinds:

* **multiple choice** (the row has the choices): ``{"question", "choices", "label", "task",
  ...}``; ``label`` is the correct choice's index, given as an integer, as the text of the
  choice, as the name of its field (``choices: [A, B, C, D]`` with ``label: "C"``) or, in a
  CSV file, as an integer written as text;
* **generation** (no choices, a string ``answer``): ``{"question", "answer", "task", ...}``;
  trained with the loss on the answer's tokens and scored by lm-eval ``generate_until`` with
  ``exact_match`` (:mod:`harness.data.generation`).

Other fields of the row are kept after these (mapped-from fields are not). A row without a
``task`` gets the test file's stem (hub: the subset, else the dataset's last name part),
in both splits, so train and test tasks line up. Every error is a
:class:`~harness.data.jsonl.DataError` that starts with where the row is (``file:line`` for
JSONL, ``file: row N`` otherwise, ``dataset (subset) split S: row N`` for the hub) and says
what would be valid. A task's items are all of one kind.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq

from harness.data.generation import is_generation, validate_generation_item
from harness.data.jsonl import DataError, _quiet_datasets, read_utf8, validate_item

#: data sources read by this module (``jsonl`` is the older name of ``files``)
FILE_SOURCES = ("jsonl", "files")
__all__ = ["FILE_SOURCES", "HUB_SOURCE", "file_rows", "hub_rows", "is_generation", "load_item_file", "read_items",
           "to_item"]
HUB_SOURCE = "hub"
FIELD_NAMES = ("question", "choices", "label", "answer", "task")
SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
_INT = re.compile(r"^-?\d+$")
_TASK_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


# -- rows ---------------------------------------------------------------------------------------


def _jsonl_rows(path: Path) -> list[tuple[str, Any]]:
    """``("file:line", object)`` for every non-blank line of a JSON Lines file."""
    text = read_utf8(path)  # a non-UTF-8 byte is named with its line
    rows = []
    # Split on "\n" only (as JSON Lines readers do): U+2028 and friends may sit inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            rows.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    return rows


def _numbered(where: str, records: Sequence[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{where}: row {i}", row) for i, row in enumerate(records, start=1)]


def _disk_rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    import datasets  # imported where used: at module level it cost every harness process 1.2 s
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=True)
    except (FileNotFoundError, ValueError) as e:
        raise DataError(
            f"{path}: not a folder written by datasets' save_to_disk ({e}); valid: a .jsonl, .json, "
            ".csv or .parquet file, or a save_to_disk folder"
        ) from None
    if isinstance(loaded, datasets.DatasetDict):
        splits = list(loaded)
        raise DataError(
            f"{path}: a DatasetDict with splits {', '.join(splits)}; point data.train / data.test at "
            f"one split's folder (e.g. {path / splits[0]})"
        )
    return _numbered(str(path), loaded.to_list())


def file_rows(path: str | Path) -> tuple[str, list[tuple[str, Any]]]:
    """``(format, [(where, row), ...])`` of a data file or ``save_to_disk`` folder, read with
    the ecosystem's readers (pandas for CSV, pyarrow for parquet, ``datasets`` for folders;
    JSON Lines line by line, so errors name the line). Raises :class:`DataError` for a
    missing path, an unknown suffix or an empty file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if path.is_dir():
        kind, rows = "disk", _disk_rows(path)
    else:
        kind = SUFFIXES.get(path.suffix.lower())
        if kind is None:
            raise DataError(
                f"{path}: unknown data format {path.suffix or '(no suffix)'!r}; valid: "
                f"{', '.join(SUFFIXES)} files or a datasets save_to_disk folder"
            )
        if kind == "jsonl":
            rows = _jsonl_rows(path)
        elif kind == "csv":
            try:  # every cell as text: a label "1" or "B" is read as written
                frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8")
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                raise DataError(f"{path}: pandas could not read the CSV file ({e})") from None
            rows = _numbered(str(path), frame.to_dict("records"))
        else:
            try:
                records = pq.read_table(path).to_pylist()
            except Exception as e:  # pyarrow's errors have no common base class
                raise DataError(f"{path}: pyarrow could not read the parquet file ({e})") from None
            rows = _numbered(str(path), records)
    if not rows:
        raise DataError(
            f"{path}: file is empty (no rows; expected items with fields question, choices, label, "
            "or question, answer for a generation task)"
        )
    return kind, rows


def hub_rows(dataset: str, subset: str | None, split: str) -> list[tuple[str, dict[str, Any]]]:
    """The rows of one split of a ``datasets.load_dataset`` dataset (a hub id, read from the
    local cache when ``HF_DATASETS_OFFLINE=1``, or a local dataset folder)."""
    import datasets  # see _disk_rows
    where = f"{dataset}" + (f" ({subset})" if subset else "") + f" split {split}"
    try:
        with _quiet_datasets():
            loaded = datasets.load_dataset(dataset, subset, split=split)
    except (ConnectionError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as e:
        offline = datasets.config.HF_DATASETS_OFFLINE
        raise DataError(
            f"data.dataset {dataset!r}"
            + (f" (subset {subset!r})" if subset else "")
            + (
                " is not in the local datasets cache and HF_DATASETS_OFFLINE=1 forbids a download; "
                "load it once with network access (datasets.load_dataset) or point data.source: files "
                "at local files"
                if offline
                else " could not be loaded"
            )
            + f" ({type(e).__name__}: {e})"
        ) from None
    except ValueError as e:  # an unknown split or subset
        raise DataError(f"data.dataset {dataset!r}: {e}") from None
    rows = _numbered(where, loaded.to_list())
    if not rows:
        raise DataError(f"{where}: no rows")
    return rows


# -- items --------------------------------------------------------------------------------------


def field_map(fields: Mapping[str, Any] | None) -> dict[str, Any]:
    """The harness name -> the data's field name(s), every name filled in (checked)."""
    fields = dict(fields or {})
    unknown = [k for k in fields if k not in FIELD_NAMES]
    if unknown:
        raise DataError(
            f"data.fields has unknown key(s) {', '.join(map(repr, unknown))} (valid: {', '.join(FIELD_NAMES)})"
        )
    for key, value in fields.items():
        ok = (isinstance(value, str) and bool(value)) or (
            key == "choices" and isinstance(value, list) and len(value) >= 2
            and all(isinstance(v, str) and v for v in value)
        )
        if not ok:
            valid = "a field name, or a list of at least 2 field names (one choice each)" if key == "choices" \
                else "a field name"
            raise DataError(f"data.fields.{key} = {value!r} is not valid; expected {valid}")
    return {name: fields.get(name, name) for name in FIELD_NAMES}


def _choices(row: dict[str, Any], spec: Any, where: str, kind: str) -> list | None:
    """The row's choices (``None``: the row has none, a generation item)."""
    if isinstance(spec, list):
        missing = [f for f in spec if f not in row]
        if len(missing) == len(spec):
            return None
        if missing:
            raise DataError(f"{where}: missing choice field(s) {', '.join(map(repr, missing))} (fields.choices: {spec})")
        return [row[f] for f in spec]
    if spec not in row:
        return None
    value = row[spec]
    if isinstance(value, str) and (kind == "csv" or value.lstrip().startswith("[")):
        try:  # a JSON list written as text
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(
                f"{where}: choices field {spec!r} holds the text {value!r}; in a CSV file write the "
                "choices as a JSON list (\"[\"\"a\"\", \"\"b\"\"]\") or give one column per choice "
                "(fields.choices: [A, B, C, D])"
            ) from None
    return list(value) if isinstance(value, tuple) else value


def _label(value: Any, choices: list, spec: Any, where: str, kind: str) -> Any:
    """A string label as its choice's index (its text, its field's name or, in CSV, a number)."""
    if not isinstance(value, str):
        return value
    if value in choices:
        return choices.index(value)
    if isinstance(spec, list) and value in spec:
        return spec.index(value)
    if kind == "csv" and _INT.match(value.strip()):
        return int(value)
    valid = f"one of the choices {choices!r}"
    if isinstance(spec, list):
        valid += f", a choice field name {spec!r}"
    raise DataError(f"{where}: label {value!r} is not among the choices (valid: {valid} or an index 0..{len(choices) - 1})")


def to_item(row: Any, fields: dict[str, Any], where: str, default_task: str, kind: str = "jsonl") -> dict[str, Any]:
    """One row as a checked harness item (see the module docstring); errors name ``where``."""
    if not isinstance(row, dict):  # not an object: the harness's own message
        try:
            validate_item(row)
        except ValueError as e:
            raise DataError(f"{where}: {e}") from None
    if kind == "csv":  # an empty cell is a missing value, as a null is in the other formats
        row = {k: v for k, v in row.items() if v != ""}
    row = {k: v for k, v in row.items() if v is not None}
    used = {fields["question"], fields["label"], fields["answer"], fields["task"]}
    used |= set(fields["choices"]) if isinstance(fields["choices"], list) else {fields["choices"]}
    rest = {k: v for k, v in row.items() if k not in used and k not in FIELD_NAMES}
    task_value = row.get(fields["task"], default_task)
    choices = _choices(row, fields["choices"], where, kind)
    if choices is None and fields["answer"] in row:
        answer = row[fields["answer"]]
        if isinstance(answer, int) and not isinstance(answer, bool):
            answer = str(answer)
        item = {"question": row.get(fields["question"]), "answer": answer, "task": task_value}
        check = validate_generation_item
    else:
        item = {"question": row.get(fields["question"]), "choices": choices, "label": row.get(fields["label"])}
        if fields["question"] not in row:
            item.pop("question")
        if choices is None:
            item.pop("choices")
        if fields["label"] not in row:
            item.pop("label")
        elif isinstance(choices, list):
            item["label"] = _label(item["label"], choices, fields["choices"], where, kind)
        item["task"] = task_value
        check = validate_item
    if fields["task"] not in row:
        item["task"] = default_task
    item |= rest
    try:
        check(item)
    except ValueError as e:
        renamed = {k: v for k, v in fields.items() if k != v}
        note = f" (data.fields: {renamed})" if renamed else ""
        raise DataError(f"{where}: {e}{note}") from None
    return item


def check_task_kinds(items: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Every task's items are of one kind (all multiple choice or all generation)."""
    first: dict[str, tuple[str, bool]] = {}
    for where, item in items:
        gen = is_generation(item)
        seen = first.setdefault(item["task"], (where, gen))
        if seen[1] != gen:
            kinds = {True: "a generation item", False: "a multiple-choice item"}
            raise DataError(
                f"{where}: {kinds[gen]} in task {item['task']!r}, whose first item ({seen[0]}) is "
                f"{kinds[seen[1]]}; a task's items must all be of one kind"
            )


def default_task(data_cfg: Mapping[str, Any]) -> str:
    """The task of rows without one: the test file's stem (hub: the subset or the dataset's
    last name part), with characters an lm-eval task name cannot hold replaced by ``_``."""
    if data_cfg["source"] == HUB_SOURCE:
        name = data_cfg.get("subset") or str(data_cfg["dataset"]).rstrip("/").split("/")[-1]
        return _TASK_CHARS.sub("_", name).strip("_") or "task"
    return Path(data_cfg["test"]).stem


def read_items(data_cfg: Mapping[str, Any], split: str) -> list[tuple[str, dict[str, Any]]]:
    """``(where, item)`` for every row of the ``train`` or ``test`` side of a files or hub
    data config, mapped through ``data.fields`` and checked, in the data's order (no
    ``data.tasks`` selection here)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    fields = field_map(data_cfg.get("fields"))
    task = default_task(data_cfg)
    if data_cfg["source"] == HUB_SOURCE:
        if not data_cfg.get("dataset"):
            raise DataError("data.source is hub, so data.dataset (a datasets.load_dataset name) is required")
        kind, rows = "hub", hub_rows(data_cfg["dataset"], data_cfg.get("subset"), data_cfg.get(split) or split)
    elif data_cfg["source"] in FILE_SOURCES:
        kind, rows = file_rows(data_cfg[split])
    else:
        raise DataError(f"data.source {data_cfg['source']!r} is not read from files or datasets")
    items = [(where, to_item(row, fields, where, task, kind)) for where, row in rows]
    check_task_kinds(items)
    return items


def load_item_file(path: str | Path) -> list[dict[str, Any]]:
    """The items of a JSONL file the data step wrote (multiple-choice and generation items
    alike; a missing ``task`` is the file's stem), checked line by line."""
    path = Path(path)
    _, rows = file_rows(path)
    return [to_item(row, field_map(None), where, path.stem) for where, row in rows]
