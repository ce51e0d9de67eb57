"""The data step: a config's ``data`` section -> train JSONL, lm-eval task folder, summary.

``prepare_data(data_cfg, out_dir)`` accepts either

* ``{"source": "generated", "seed": 1234, "tasks": [...], "train_per_task": 256,
  "test_per_task": 100}`` (``tasks`` optional: all of :data:`harness.data.suite.TASKS`), or
* ``{"source": "files", "train": "path/train.csv", "test": "path/test.parquet",
  "fields": {...}}`` (``jsonl`` is the older name of the same source): JSONL, CSV or parquet
  files or ``datasets`` ``save_to_disk`` folders, or ``{"source": "hub", "dataset": name,
  "subset": config, "train": split, "test": split}``, read by :mod:`harness.data.sources`
  with the optional field mapping ``fields`` (optional ``tasks`` keeps only those tasks;
  test items are grouped into lm-eval tasks by their ``task`` field; items without one get
  the test file's stem, in both files, so train and test tasks line up). Multiple-choice
  and generation items (a string answer) alike. ``seed``, ``train_per_task`` and
  ``test_per_task`` (which the config loader fills in as defaults) are ignored here.
* ``{"source": "lm_eval", "tasks": ["boolq", "piqa", ...], "train_per_task": None,
  "seed": 1234, "include_path": None}``: the train splits of lm-eval tasks, rendered
  by lm-eval (:mod:`harness.data.lm_eval_train`); ``train_per_task`` caps each task
  (a seeded subset), ``None`` keeps every item. No task folder is written: evaluation
  scores the same registry tasks (``eval.tasks``) on their own evaluation splits.

and writes into ``out_dir``::

    train.jsonl          every training item, with its task
    tasks/               the lm-eval task folder (harness.data.lm_eval_tasks)
    data_summary.json    source, seed, counts and label histograms per task per
                         split, sha256 of train.jsonl and of every test file,
                         the group and the lm-eval task names
    manifest.json        sha256 and size of every file above (harness.common.manifest):
                         training and scoring verify the files they read against it

Every file is written atomically and only when its content changed, so a rerun
with the same config leaves all mtimes alone. Returns the summary dict.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from harness.common.files import write_if_changed
from harness.common.manifest import record_tree
from harness.common.metrics import primary_for
from harness.data.generation import GENERATION_METRIC
from harness.data.jsonl import DataError, write_jsonl
from harness.data.lm_eval_tasks import write_task_folder
from harness.data.sources import FILE_SOURCES, HUB_SOURCE, is_generation, read_items
from harness.data.suite import TASKS, generate_suite
from harness.data.tasks import test_data_digest, training_data_digest
from harness.data.validation import validation_split

SOURCES = ("generated", *FILE_SOURCES, HUB_SOURCE, "lm_eval")
GENERATED_KEYS = ("source", "seed", "tasks", "train_per_task", "test_per_task")
JSONL_KEYS = ("source", "train", "test", "tasks", "fields")
HUB_KEYS = ("source", "dataset", "subset", "train", "test", "tasks", "fields")
LM_EVAL_KEYS = ("source", "tasks", "train_per_task", "seed", "include_path")
# Filled in by the config loader's schema defaults whatever the source; unused for jsonl.
_JSONL_IGNORED = ("seed", "train_per_task", "test_per_task", "allow_overlap")
# Likewise: lm-eval's own splits decide the test items.
_LM_EVAL_IGNORED = ("test_per_task",)
SUITE_PREFIX = "moelora"
SUMMARY_NAME = "data_summary.json"


def _check_config(data_cfg: dict[str, Any]) -> str:
    if not isinstance(data_cfg, dict):
        raise ValueError(f"data config must be a mapping, got {type(data_cfg).__name__}")
    if "source" not in data_cfg:
        raise ValueError(f"data config is missing key 'source' (valid: {', '.join(SOURCES)})")
    source = data_cfg["source"]
    if source not in SOURCES:
        raise ValueError(f"data.source must be one of: {', '.join(SOURCES)} (got {source!r})")
    valid, shown = {
        "generated": (GENERATED_KEYS, GENERATED_KEYS),
        "jsonl": (JSONL_KEYS + _JSONL_IGNORED, JSONL_KEYS),
        "files": (JSONL_KEYS + _JSONL_IGNORED, JSONL_KEYS),
        HUB_SOURCE: (HUB_KEYS + _JSONL_IGNORED, HUB_KEYS),
        "lm_eval": (LM_EVAL_KEYS + _LM_EVAL_IGNORED, LM_EVAL_KEYS),
    }[source]
    if source != "lm_eval" and data_cfg.get("include_path") is not None:
        raise ValueError(f"data.include_path is only used with source 'lm_eval' (source is {source!r})")
    # the config loader fills in include_path: None whatever the source
    unknown = [k for k in data_cfg if k not in valid and not (k == "include_path" and data_cfg[k] is None)]
    if unknown:
        raise ValueError(
            f"unknown data key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"for source {source!r} (valid keys: {', '.join(shown)})"
        )
    if source in FILE_SOURCES:
        for key in ("train", "test"):
            if key not in data_cfg:
                raise ValueError(
                    f"data config with source {source!r} is missing key {key!r} "
                    f"(a path to a JSONL, CSV or parquet file or a save_to_disk folder; required keys: train, test)"
                )
            if not isinstance(data_cfg[key], (str, Path)) or not str(data_cfg[key]):
                raise ValueError(
                    f"data.{key} must be a path to a JSONL, CSV or parquet file or a save_to_disk folder, "
                    f"got {data_cfg[key]!r}"
                )
    if source == HUB_SOURCE and not data_cfg.get("dataset"):
        raise ValueError("data config with source 'hub' is missing key 'dataset' (a datasets.load_dataset name)")
    return source


def _select_tasks(items: list[dict], tasks: list[str] | None, split: str, path: Path) -> list[dict]:
    if tasks is None:
        return items
    if isinstance(tasks, str) or not list(tasks):
        raise ValueError(f"data.tasks must be a non-empty list of task names, got {tasks!r}")
    found = list(dict.fromkeys(it["task"] for it in items))
    missing = [t for t in tasks if t not in found]
    if missing:
        raise ValueError(
            f"data.tasks names {', '.join(map(repr, missing))}, which {path} ({split}) does not "
            f"have (tasks there: {', '.join(found)})"
        )
    keep = set(tasks)
    return [it for it in items if it["task"] in keep]


def _counts(items: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for it in items:
        counts[it["task"]] = counts.get(it["task"], 0) + 1
    return counts


def _label_histogram(items: list[dict]) -> dict[str, list[int]]:
    """task -> count of each label value (list index = label); multiple-choice tasks only."""
    hist: dict[str, list[int]] = {}
    for it in items:
        if is_generation(it):
            continue
        h = hist.setdefault(it["task"], [])
        width = max(len(it["choices"]), it["label"] + 1)
        h.extend([0] * (width - len(h)))
        h[it["label"]] += 1
    return hist


def _families(items: list[dict]) -> dict[str, str] | None:
    """Each task's ``family`` when every item names one and a task's items agree."""
    families: dict[str, str] = {}
    for it in items:
        family = it.get("family")
        if not isinstance(family, str) or families.setdefault(it["task"], family) != family:
            return None
    return families or None


def primary_metric(items: list[dict]) -> str:
    """The metric a task is reported with, by its answer form (the metric registry's
    :func:`harness.common.metrics.primary_for`: ``acc`` when every choice is one word,
    ``acc_norm`` when the choices are phrases); ``exact_match`` for a generation task."""
    if items and all(is_generation(it) for it in items):
        return GENERATION_METRIC
    return primary_for(items)


def load_general_text(path: str | Path) -> list[dict[str, Any]]:
    """The documents of a general-text file (one ``{"text": ...}`` object a line), checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"eval.general_text: {path} is not a file (a JSONL of {{\"text\": ...}} documents)")
    out = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
        except ValueError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str) or not doc["text"].strip():
            raise DataError(f"{path}:{number}: expected an object with a non-empty string field 'text'")
        out.append(doc)
    if not out:
        raise DataError(f"{path}: no documents")
    return out


def _sha256(path: Path) -> str:
    """Of a file's bytes; of a folder (``save_to_disk``), of its files' names and bytes."""
    if path.is_dir():
        h = hashlib.sha256()
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            h.update(f.relative_to(path).as_posix().encode() + b"\0" + f.read_bytes())
        return h.hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def prepare_data(
    data_cfg: dict[str, Any],
    out_dir: Path,
    general_text: str | Path | None = None,
    tune: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``train.jsonl``, ``tasks/`` and ``data_summary.json`` into ``out_dir`` and
    return the summary (see the module docstring). ``general_text`` (``eval.general_text``):
    a JSONL file of documents the task folder also scores by ``loglikelihood_rolling``.
    ``tune`` (the config's ``tune`` section): also the tuning data, ``tune/train.jsonl`` (the
    training items minus a validation split) and ``tune/tasks/`` (the validation items as an
    lm-eval task folder), :func:`harness.data.validation.validation_split`."""
    source = _check_config(data_cfg)
    out_dir = Path(out_dir)
    summary: dict[str, Any] = {"source": source}
    if source == "generated":
        seed = data_cfg.get("seed", 1234)
        tasks = data_cfg.get("tasks")
        train_per_task = data_cfg.get("train_per_task", 256)
        test_per_task = data_cfg.get("test_per_task", 100)
        suite = generate_suite(seed, tasks, train_per_task, test_per_task)
        train, test = suite["train"], suite["test"]
        summary |= {
            "seed": seed,
            "train_per_task": train_per_task,
            "test_per_task": test_per_task,
        }
    elif source in (*FILE_SOURCES, HUB_SOURCE):
        # default task: the test file's stem (hub: the subset or dataset name), for both sides
        test = [item for _, item in read_items(data_cfg, "test")]
        train = [item for _, item in read_items(data_cfg, "train")]
        tasks = data_cfg.get("tasks")
        if source == HUB_SOURCE:
            where = {s: f"{data_cfg['dataset']} split {data_cfg.get(s) or s}" for s in ("train", "test")}
            test = _select_tasks(test, tasks, "test", where["test"])
            train = _select_tasks(train, tasks, "train", where["train"])
            summary |= {
                "seed": None,
                "dataset": data_cfg["dataset"],
                "subset": data_cfg.get("subset"),
                "splits": {s: data_cfg.get(s) or s for s in ("train", "test")},
            }
        else:
            train_path, test_path = Path(data_cfg["train"]), Path(data_cfg["test"])
            test = _select_tasks(test, tasks, "test", test_path)
            train = _select_tasks(train, tasks, "train", train_path)
            summary |= {
                "seed": None,
                "train_file": str(train_path),
                "test_file": str(test_path),
                "source_sha256": {"train": _sha256(train_path), "test": _sha256(test_path)},
            }
        if data_cfg.get("fields"):
            summary["fields"] = data_cfg["fields"]
    else:  # lm_eval: training mixture only; evaluation reads the tasks from lm-eval itself
        return _prepare_lm_eval(data_cfg, out_dir, summary)
    if not train:
        raise DataError(f"no training items for data config {data_cfg!r}")

    train_file = out_dir / "train.jsonl"
    write_jsonl(train, train_file)
    folder = write_task_folder(test, out_dir / "tasks", prefix=SUITE_PREFIX, general_text=general_text)
    test_files = {t: f"tasks/{rel}" for t, rel in folder["data_files"].items()}
    summary |= {
        "group": folder["group"],
        "tasks": folder["tasks"],
        "suite_tasks": folder["suite_tasks"],
        # task -> family: the suite's own, or a JSONL file's optional `family` field
        "families": {t: TASKS[t].family for t in folder["suite_tasks"]}
        if source == "generated"
        else _families(test),
        "train_counts": _counts(train),
        "test_counts": _counts(test),
        "primary_metric": {
            t: primary_metric([it for it in test if it["task"] == t]) for t in folder["suite_tasks"]
        },
        # always answering the most common label, and answering at random
        "majority_share": {
            t: max(h) / sum(h) for t, h in _label_histogram(test).items() if sum(h)
        },
        "chance": {
            t: sum(1 / len(it["choices"]) for it in test if it["task"] == t)
            / sum(1 for it in test if it["task"] == t)
            for t in folder["suite_tasks"]
            if not any(is_generation(it) for it in test if it["task"] == t)
        },
        "label_histogram": {"train": _label_histogram(train), "test": _label_histogram(test)},
        "files": {"train": "train.jsonl", "task_folder": "tasks", "test": test_files},
        "sha256": {
            "train.jsonl": _sha256(train_file),
            **{rel: _sha256(out_dir / rel) for rel in test_files.values()},
        },
    }
    if tune:
        tune_train, valid = validation_split(train, tune["validation_fraction"], tune["seed"])
        write_jsonl(tune_train, out_dir / "tune" / "train.jsonl")
        tune_folder = write_task_folder(valid, out_dir / "tune" / "tasks", prefix=SUITE_PREFIX)
        summary["tune"] = {
            "group": tune_folder["group"],
            "tasks": tune_folder["tasks"],
            "train_counts": _counts(tune_train),
            "validation_counts": _counts(valid),
            "validation_fraction": tune["validation_fraction"],
            "seed": tune["seed"],
            "files": {"train": "tune/train.jsonl", "task_folder": "tune/tasks"},
        }
    if general_text is not None:
        documents = load_general_text(general_text)
        summary["general_text"] = {
            "task": folder["general_text"],
            "file": str(general_text),
            "sha256": _sha256(Path(general_text)),
            "documents": len(documents),
            "words": sum(len(d["text"].split()) for d in documents),
        }
    summary["train_content"] = training_data_digest(data_cfg)
    summary["test_content"] = test_data_digest({"data": data_cfg, "eval": {"general_text": general_text}})
    write_if_changed(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    record_tree(out_dir, ["train.jsonl", "tune/train.jsonl", SUMMARY_NAME], ["tasks", "tune/tasks"])
    return summary


def _prepare_lm_eval(data_cfg: dict[str, Any], out_dir: Path, summary: dict[str, Any]) -> dict[str, Any]:
    from harness.data.lm_eval_train import load_lm_eval_items

    tasks = data_cfg.get("tasks")
    include_path = data_cfg.get("include_path")
    cap = data_cfg.get("train_per_task")
    seed = data_cfg.get("seed", 1234)
    train = load_lm_eval_items(tasks, include_path=include_path, split="train", per_task=cap, seed=seed)
    if not train:
        raise DataError(f"no training items for data config {data_cfg!r}")
    train_file = out_dir / "train.jsonl"
    write_jsonl(train, train_file)
    summary |= {
        "seed": seed,
        "train_per_task": cap,
        "include_path": include_path,
        "group": None,
        "tasks": [],  # no suite task folder: eval.tasks are scored from lm-eval's registry
        "lm_eval_tasks": list(tasks),
        "suite_tasks": list(tasks),
        "families": None,
        "train_counts": _counts(train),
        "test_counts": {},
        "label_histogram": {"train": _label_histogram(train), "test": {}},
        "files": {"train": "train.jsonl", "task_folder": None, "test": {}},
        "sha256": {"train.jsonl": _sha256(train_file)},
    }
    write_if_changed(out_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    record_tree(out_dir, ["train.jsonl", "tune/train.jsonl", SUMMARY_NAME], ["tasks", "tune/tasks"])
    return summary
