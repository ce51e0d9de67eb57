"""Local JSONL multiple-choice files: validate, load (through ``datasets``), write.

One JSON object a line::

    {"question": "...", "choices": ["a", "b", ...], "label": 1, "task": "optional"}

* ``question``: a non-empty string;
* ``choices``: a list of at least 2 non-empty strings;
* ``label``: an integer (``true``/``false`` are not), ``0 <= label < len(choices)``;
* ``task`` (optional): a non-empty string; default ``default_task`` or the file stem.

Blank lines are skipped; other fields are kept as they are (an ``id`` field, when
present, must be unique within its file: :mod:`harness.data.hygiene`). Every error is a
:class:`DataError` whose message starts with ``"{path}:{line}: "`` and says what
would be valid. After the line-by-line check the file is loaded through the
``datasets`` library (the project's rule for data loading), into a private
temporary cache so that a rewritten file is never served from a stale cache.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.common.files import write_if_changed

REQUIRED_FIELDS = ("question", "choices", "label")
OPTIONAL_FIELDS = ("task",)
_FIELDS_HINT = f"(required: {', '.join(REQUIRED_FIELDS)}; optional: {', '.join(OPTIONAL_FIELDS)})"


class DataError(ValueError):
    """A data file that cannot be used, with the file, line and what would be valid."""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def validate_item(obj: Any) -> None:
    """Raise ``ValueError`` (message without location) when ``obj`` is not a valid item."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object {_FIELDS_HINT}, got {_type_name(obj)}")
    for field in REQUIRED_FIELDS:
        if field not in obj:
            raise ValueError(f"missing field {field!r} {_FIELDS_HINT}")
    question = obj["question"]
    if not isinstance(question, str) or not question.strip():
        got = "an empty string" if isinstance(question, str) else _type_name(question)
        raise ValueError(f"question must be a non-empty string, got {got}")
    choices = obj["choices"]
    if not isinstance(choices, list) or len(choices) < 2:
        got = f"a list of {len(choices)}" if isinstance(choices, list) else _type_name(choices)
        raise ValueError(f"choices must be a list of at least 2 strings, got {got}")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise ValueError(
                f"choices must be a list of at least 2 strings, got {_type_name(choice)} at index {i}"
            )
        if not choice.strip():
            raise ValueError(f"choices[{i}] is empty (choices must be non-empty strings)")
    label = obj["label"]
    if isinstance(label, bool) or not isinstance(label, int):
        raise ValueError(
            f"label must be an integer index into choices (valid: 0..{len(choices) - 1}), "
            f"got {_type_name(label)}"
        )
    if not 0 <= label < len(choices):
        raise ValueError(
            f"label {label} out of range for {len(choices)} choices (valid: 0..{len(choices) - 1})"
        )
    if "task" in obj:
        task = obj["task"]
        if not isinstance(task, str) or not task.strip():
            got = "an empty string" if isinstance(task, str) else _type_name(task)
            raise ValueError(f"task must be a non-empty string when given, got {got}")


def read_utf8(path: Path) -> str:
    """The file's text; a byte that is not UTF-8 is a :class:`DataError` naming its line
    (``"{path}:{line}: "``) and its position in the line."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line_start = raw.rfind(b"\n", 0, e.start) + 1
        lineno = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{lineno}: not UTF-8 text (byte 0x{raw[e.start]:02x} at byte "
            f"{e.start - line_start + 1} of the line: {e.reason}); save the file as UTF-8"
        ) from None


def validated_lines(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every non-blank line, each validated."""
    if not path.exists():
        raise DataError(f"{path}: file not found")
    if not path.is_file():
        raise DataError(f"{path}: not a file")
    text = read_utf8(path)
    rows: list[tuple[int, dict[str, Any]]] = []
    # Split on "\n" only (as JSON Lines readers do): U+2028 and friends may sit inside strings.
    for lineno, line in enumerate(text.split("\n"), start=1):
        line = line.removesuffix("\r")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})"
            ) from None
        try:
            validate_item(obj)
        except ValueError as e:
            raise DataError(f"{path}:{lineno}: {e}") from None
        rows.append((lineno, obj))
    if not rows:
        raise DataError(
            f"{path}: file is empty (expected one JSON object per line with fields "
            f"{', '.join(REQUIRED_FIELDS)} and optionally {', '.join(OPTIONAL_FIELDS)})"
        )
    return rows


@contextmanager
def _quiet_datasets():
    """Silence ``datasets``' progress bars for the duration, then restore them."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def load_json_dataset(path: str | Path):
    """A JSONL file as a ``datasets.Dataset`` (one split), built in a private temporary
    cache and held in memory: no stale cache, nothing left in the user's cache."""
    import datasets

    with _quiet_datasets(), tempfile.TemporaryDirectory(prefix="harness-datasets-") as cache:
        return datasets.load_dataset(
            "json", data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
        )


def load_jsonl(path: str | Path, default_task: str | None = None) -> list[dict[str, Any]]:
    """Validate ``path`` line by line, load it through ``datasets`` and return its items
    as plain dicts (``question``, ``choices``, ``label``, ``task``, then any other
    fields of the line), in file order. A missing ``task`` becomes ``default_task``
    or, without one, the file stem."""
    path = Path(path)
    lines = validated_lines(path)
    fallback_task = default_task if default_task is not None else path.stem
    try:
        dataset = load_json_dataset(path)
    except Exception as e:  # pyarrow/datasets errors have no common base class
        raise DataError(f"{path}: the datasets library could not load the file ({e})") from e
    if len(dataset) != len(lines):
        raise DataError(
            f"{path}: the datasets library read {len(dataset)} rows, the file has "
            f"{len(lines)} non-blank lines"
        )
    items = []
    for (lineno, obj), row in zip(lines, dataset):
        for field in (*REQUIRED_FIELDS, *OPTIONAL_FIELDS):
            if field in obj and row[field] != obj[field]:
                raise DataError(
                    f"{path}:{lineno}: the datasets library read {field} as {row[field]!r}, "
                    f"the file says {obj[field]!r}"
                )
        item = {
            "question": row["question"],
            "choices": list(row["choices"]),
            "label": int(row["label"]),
            "task": row["task"] if "task" in obj else fallback_task,
        }
        item.update({k: row[k] for k in obj if k not in item})
        items.append(item)
    return items


def dumps_jsonl(items: Iterable[dict[str, Any]]) -> str:
    """Items as JSON Lines text (one object a line, keys in item order, UTF-8 kept)."""
    return "".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items)


def write_jsonl(items: Iterable[dict[str, Any]], path: str | Path) -> bool:
    """Write items as JSONL atomically, only if the content changed (mtimes of unchanged
    files stay put, so Snakemake sees nothing new). Returns whether it wrote."""
    return write_if_changed(path, dumps_jsonl(items))
