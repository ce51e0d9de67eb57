"""What a writer wrote, recorded once, and checked by every reader before it uses a file.

Each folder the harness writes results into (a run or component folder, the study's data
folder, the study's ``out_dir`` for the summary, tables and figures) holds ``manifest.json``::

    {"files": {"<path relative to the folder>": {"sha256": "<hex>", "bytes": <size>}, ...}}

A writer calls :func:`record_files` right after it wrote its files (atomically, merged with
what the folder's other writers recorded). A reader calls :func:`verify_files` with the
files it is about to use: a file whose content no longer matches its record raises
:class:`VerificationError`, which names the file, the recorded and the found digest and the
runs the file affects. :func:`check_files` returns the same findings without raising (the
status and the DAG use it).

A digest detects a file that changed after it was written (damage, truncation, a hand edit,
a half-finished copy); it cannot tell a deliberate, consistent edit of a file *and* its
record from the real thing.

:func:`missing_fields` is the result schema: the fields every ``train.json`` and
``metrics.json`` must have before it counts as done.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common.files import write_if_changed

MANIFEST_NAME = "manifest.json"

#: the fields a result file must hold before it counts as done (its readers use all of them)
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "train.json": (
        "run_id", "method", "variant", "granularity", "seed", "steps", "examples",
        "final_loss", "first_loss", "params", "method_config", "effective_config",
    ),
    "metrics.json": (
        "run_id", "method", "variant", "granularity", "seed", "suite_acc", "tasks", "items",
        "test_data",
    ),
}


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | Path) -> str:
    """The sha256 of a file's bytes (read in 1 MiB blocks; remembered in this process for a
    file of the same path, size and modification time, so planning a study hashes each
    result file once)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def file_entry(path: str | Path) -> dict[str, Any]:
    """``{"sha256": ..., "bytes": ...}`` of one file."""
    path = Path(path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def read_manifest(folder: str | Path) -> dict[str, dict[str, Any]] | None:
    """The files ``folder/manifest.json`` records (``None``: the folder has no manifest, e.g.
    written before the harness recorded manifests). An unreadable manifest raises
    :class:`VerificationError`: nothing in the folder can be checked against it."""
    path = Path(folder) / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        raise VerificationError(f"{path} is not valid JSON ({exc}): the files of {folder} cannot be verified") from None
    files = value.get("files") if isinstance(value, dict) else None
    if not isinstance(files, dict):
        raise VerificationError(f"{path} has no 'files' mapping: the files of {folder} cannot be verified")
    return files


#: the names :func:`harness.plan.status.aside_name` gives an invalid file (never recorded)
_ASIDE = re.compile(r"\.(corrupt|stale|foreign|orphan)-[0-9a-f]{8}$")


def record_tree(folder: str | Path, names: Iterable[str] = (), trees: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """Record, as the whole of ``folder/manifest.json`` (for a folder one writer owns, such
    as the data folder), the files among ``names`` that exist and every file under each of
    ``trees`` (relative to ``folder``; caches, hidden and set-aside files left out)."""
    folder = Path(folder)
    found = [n for n in names if (folder / n).is_file()]
    for tree in trees:
        for path in sorted((folder / tree).rglob("*")):
            rel = path.relative_to(folder)
            if (path.is_file() and "__pycache__" not in rel.parts
                    and not any(p.startswith(".") for p in rel.parts) and not _ASIDE.search(path.name)):
                found.append(rel.as_posix())
    return record_files(folder, found, replace=True)


def record_files(folder: str | Path, names: Iterable[str | Path], replace: bool = False) -> dict[str, dict[str, Any]]:
    """Record the digest and size of ``names`` (paths relative to ``folder``, or inside it) in
    ``folder/manifest.json``, keeping the entries other writers recorded there (``replace``:
    dropping them), and return the entries written. A name that is not a file is an error (a
    writer records only what it wrote)."""
    folder = Path(folder)
    entries = {}
    for name in names:
        path = Path(name)
        rel = path.relative_to(folder) if path.is_absolute() else path
        full = folder / rel
        if not full.is_file():
            raise FileNotFoundError(f"{full}: cannot record a file that is not there")
        entries[rel.as_posix()] = file_entry(full)
    with _locked(folder):  # writers of one folder running at once (summary, tables, figures)
        try:
            files = {} if replace else read_manifest(folder) or {}
        except VerificationError:
            files = {}  # the writer's own files are the ones it records now
        files = {**files, **entries}
        # unchanged content is not rewritten (a rerun of a step leaves every mtime alone)
        write_if_changed(folder / MANIFEST_NAME, json.dumps({"files": dict(sorted(files.items()))}, indent=2) + "\n")
    return entries


@contextmanager
def _locked(folder: Path):
    """An exclusive ``fcntl`` lock on ``folder/.manifest.lock`` while a manifest is rewritten."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".manifest.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class Mismatch:
    """A file whose content is not what was recorded (``found`` is ``None``: it is missing)."""

    path: Path
    recorded: str
    found: str | None

    def describe(self) -> str:
        found = "the file is missing" if self.found is None else f"found sha256 {self.found}"
        return f"{self.path}: recorded sha256 {self.recorded}, {found}"


def check_files(folder: str | Path, recorded: dict[str, str], names: Iterable[str] | None = None) -> list[Mismatch]:
    """The files among ``names`` (default: every recorded one) whose sha256 differs from
    ``recorded`` (``{relative path: sha256}``), or that are missing. A name without a record
    is not checked (:func:`verify_files` is given the records a reader relies on)."""
    folder = Path(folder)
    out = []
    for name in (recorded if names is None else names):
        digest = recorded.get(name)
        if digest is None:
            continue
        path = folder / name
        found = sha256_file(path) if path.is_file() else None
        if found != digest:
            out.append(Mismatch(path, digest, found))
    return out


def manifest_digests(folder: str | Path) -> dict[str, str] | None:
    """``{relative path: sha256}`` of ``folder/manifest.json`` (``None``: no manifest)."""
    files = read_manifest(folder)
    return None if files is None else {k: v["sha256"] for k, v in files.items() if isinstance(v, dict)}


class VerificationError(RuntimeError):
    """A file a job is about to use is not what its writer recorded: never used."""


def verify_files(folder: str | Path, recorded: dict[str, str], names: Iterable[str] | None = None,
                 affects: str = "") -> None:
    """Raise :class:`VerificationError` unless every file among ``names`` matches its record
    (see :func:`check_files`); the message names each file, both digests, what it affects
    (``affects``, e.g. ``"runs smora-G2-s0-1a2b3c4d"``) and what to do."""
    bad = check_files(folder, recorded, names)
    if bad:
        lines = "; ".join(m.describe() for m in bad)
        raise VerificationError(
            f"{lines}. The file changed after it was written"
            + (f"; it affects {affects}" if affects else "")
            + ". It is not used: `python -m harness status --config <config>` lists what is set aside, "
            "and the next snakemake writes it again and redoes what was built on it."
        )


def missing_fields(value: Any, kind: str) -> list[str]:
    """The required fields (:data:`REQUIRED_FIELDS`) that ``value``, the content of a result
    file named ``kind`` (``train.json``, ``metrics.json``), lacks or holds as ``null``
    (``test_data`` may be ``null``: a tune-stage run is scored on its validation split)."""
    if not isinstance(value, dict):
        return list(REQUIRED_FIELDS[kind])
    nullable = {"test_data"}
    return [k for k in REQUIRED_FIELDS[kind] if k not in value or (value[k] is None and k not in nullable)]


def data_record(data_dir: str | Path) -> dict[str, str]:
    """``{path relative to the data folder: sha256}`` the data step recorded: its manifest, or
    for a data folder written before manifests, the ``sha256`` map of ``data_summary.json``
    (training file and test files). Empty when neither is there or readable."""
    data_dir = Path(data_dir)
    try:
        recorded = manifest_digests(data_dir)
    except VerificationError:
        recorded = None
    if recorded is not None:
        return recorded
    try:
        summary = json.loads((data_dir / "data_summary.json").read_text())
    except (ValueError, OSError):
        return {}
    legacy = summary.get("sha256") if isinstance(summary, dict) else None
    return {k: v for k, v in legacy.items() if isinstance(v, str)} if isinstance(legacy, dict) else {}


def verify_data(data_dir: str | Path, prefixes: Iterable[str], affects: str = "") -> dict[str, str]:
    """Verify every file the data step recorded (:func:`data_record`) whose path starts with
    one of ``prefixes`` (``"tasks/"``, ``"data_summary.json"``) before a job reads them
    (:func:`verify_files`; raises :class:`VerificationError`), and return them as
    ``{path relative to out_dir ("data/..."): sha256}``: what the result records it read."""
    data_dir = Path(data_dir)
    recorded = data_record(data_dir)
    names = [rel for rel in recorded if any(rel.startswith(p) for p in prefixes)]
    verify_files(data_dir, recorded, names, affects=affects)
    return {f"{data_dir.name}/{rel}": recorded[rel] for rel in sorted(names)}
