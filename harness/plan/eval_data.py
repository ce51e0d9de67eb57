"""The ``eval data`` check: every task of ``eval.tasks`` loads its evaluation documents
before any job starts, so a scoring job never fails after hours of training because an
evaluation dataset is missing (not in the offline cache, a data file moved).

Each task is built the way the scoring job builds it (lm-eval's ``TaskManager`` over the
registry and the config's ``include_path``, :func:`harness.data.lm_eval_train.task_manager`),
which loads its dataset (``datasets.load_dataset``, from the local cache when offline), and
its evaluation split must hold at least one document. A failure names the task and the
reason (lm-eval's or ``datasets``' own error). Online, loading downloads a hub dataset into
the cache once, as the scoring job would; offline (``HF_DATASETS_OFFLINE=1``) a dataset the
cache lacks fails here, before any job. A dry run only warns (``DRY_RUN_WARNINGS``): a
login node may not hold the datasets yet; a real run stops in ``onstart``.

Building tasks takes seconds (indexing the registry, reading Arrow files), so a task's
verdict is kept in ``{cache_dir}/checks/`` keyed by what it read: lm-eval's and datasets'
versions, the ``include_path`` files, the task's name and a fingerprint of its data
(each local data file's path, size and modification time; for a hub dataset, the files of
its folders in the ``datasets`` and hub caches). Removing or changing any of them makes the
next parse load the task again. A failed verdict is never kept.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from harness.data.lm_eval_train import task_manager
from harness.plan.check_cache import cache_file, read_verdict, write_verdict

#: ``datasets`` builders that read the files named in ``data_files`` (no hub dataset)
PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas")


class EvalDataError(ValueError):
    """An eval task whose evaluation documents do not load; names the task and why."""


def eval_include_path(config: dict[str, Any]) -> str | None:
    """The ``include_path`` the scoring job looks ``eval.tasks`` up in (as
    :func:`harness.run.evaluate.evaluate_run` does)."""
    if config["data"]["source"] == "lm_eval":
        found = config["data"].get("include_path")
    else:
        found = config["eval"].get("include_path")
    return None if found is None else str(found)


def _include_digests(include_path: str | None) -> list[tuple[str, str]]:
    if include_path is None or not Path(include_path).is_dir():
        return []
    return sorted(
        (str(p), hashlib.sha256(p.read_bytes()).hexdigest()[:16])
        for p in Path(include_path).rglob("*")
        if p.is_file() and p.suffix in (".yaml", ".yml", ".py")
    )


def _file_state(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except OSError:
        return [str(path), "missing"]
    if path.is_dir():
        return [str(path), _folder_listing(path)]
    return [str(path), st.st_size, st.st_mtime_ns]


def _folder_listing(folder: Path) -> list[Any]:
    return sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())


def _data_files(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [f for v in value.values() for f in _data_files(v)]
    if isinstance(value, (list, tuple)):
        return [f for v in value for f in _data_files(v)]
    return []


def task_sources(task) -> dict[str, Any]:
    """Where a built lm-eval task's dataset comes from: its ``dataset_path``, ``dataset_name``,
    local data files and cache folder (what :func:`fingerprint` looks at)."""
    cfg = task.config
    kwargs = dict(cfg.dataset_kwargs or {})
    return {
        "dataset_path": cfg.dataset_path,
        "dataset_name": cfg.dataset_name,
        "data_files": _data_files(kwargs.get("data_files")),
        "cache_dir": kwargs.get("cache_dir"),
    }


def fingerprint(sources: list[dict[str, Any]]) -> list[Any]:
    """The state of every file the tasks' datasets are read from: local data files (path,
    size, mtime) and, for a hub dataset, the file listing of its ``datasets`` and hub cache
    folders (``"missing"`` where there is nothing)."""
    import datasets
    from huggingface_hub import constants

    out: list[Any] = []
    for source in sources:
        for name in source["data_files"]:
            out.append(_file_state(Path(name)))
        path = source["dataset_path"]
        if not path or path in PACKAGED_BUILDERS:
            continue
        if Path(path).exists():
            out.append(_file_state(Path(path)))
            continue
        cache = Path(source["cache_dir"] or datasets.config.HF_DATASETS_CACHE)
        out.append(_file_state(cache / path.replace("/", "___")))
        out.append(_file_state(Path(constants.HF_HUB_CACHE) / ("datasets--" + path.replace("/", "--"))))
    return out


def load_eval_task(name: str, include_path: str | None, manager=None) -> dict[str, Any]:
    """Build lm-eval task (or group) ``name`` as the scoring job does and count its
    evaluation documents: ``{"docs": n, "sources": [...]}``. Raises :class:`EvalDataError`
    naming the task and the reason when it does not load or has no evaluation documents."""
    try:
        manager = manager or task_manager([name], include_path)
        leaves = list(manager.load([name])["tasks"].values())
    except Exception as exc:  # lm-eval's and datasets' errors vary; each is reported as is
        raise EvalDataError(
            f"eval.tasks: task {name!r} does not load its data: {type(exc).__name__}: {exc}"
        ) from exc
    docs, sources = 0, []
    for task in leaves:
        task_name = getattr(task.config, "task", name)
        if not (task.has_test_docs() or task.has_validation_docs()):
            raise EvalDataError(
                f"eval.tasks: task {name!r} ({task_name}) has no test or validation split to score on"
            )
        count = len(task.eval_docs)
        if count == 0:
            raise EvalDataError(f"eval.tasks: task {name!r} ({task_name}) has no evaluation documents")
        docs += count
        sources.append(task_sources(task))
    return {"docs": docs, "sources": sources}


def check_eval_data(config: dict[str, Any]) -> str | None:
    """Every task of ``eval.tasks`` loads at least one evaluation document (``None`` when
    the config lists none); raises :class:`EvalDataError` naming the first task that does
    not and why. Verdicts are kept by what they read (see the module's docstring)."""
    import datasets
    import lm_eval

    names = list(config["eval"].get("tasks") or [])
    if not names:
        return None
    include = eval_include_path(config)
    base_key = {
        "lm_eval": lm_eval.__version__,
        "datasets": datasets.__version__,
        "include_path": include or "",
        "files": _include_digests(include),
        "offline": os.environ.get("HF_DATASETS_OFFLINE", ""),
    }
    counts: dict[str, int] = {}
    manager = None
    for name in names:
        key = {**base_key, "task": name}
        where = cache_file(config, "eval-data-sources", key)
        known = read_verdict(where)
        if isinstance(known, list):
            verdict = read_verdict(cache_file(config, "eval-data", [key, fingerprint(known)]))
            if isinstance(verdict, dict) and isinstance(verdict.get("docs"), int):
                counts[name] = verdict["docs"]
                continue
        if manager is None:
            manager = task_manager(names, include)
        loaded = load_eval_task(name, include, manager)
        write_verdict(where, loaded["sources"])
        write_verdict(cache_file(config, "eval-data", [key, fingerprint(loaded["sources"])]), {"docs": loaded["docs"]})
        counts[name] = loaded["docs"]
    return ", ".join(f"{n} ({counts[n]} documents)" for n in names)
