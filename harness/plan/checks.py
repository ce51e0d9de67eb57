"""Everything a study needs, checked before any job starts.

``python -m harness check --config FILE`` runs the checks and exits 0 only when the study
can run; the Snakefile runs the same checks when it is read, so ``snakemake`` (``-n``
included) stops with one message before any job starts:

* **config**: the schema (key path, bad value, what is allowed) and its semantics;
* **methods and budget**: plugins import, method names exist, every budget is feasible;
* **data**: local JSONL files line by line (file, line, field, what is valid), the task
  selection, and every test task present in the training data;
* **lm-eval tasks**: ``eval.tasks`` (and ``data.tasks`` of ``data.source: lm_eval``) are
  names lm-eval's registry knows, with a "did you mean" for a near miss;
* **model**: the base model can be found without downloading anything;
* **lengths**: every training item (prompt + answer tokens) fits ``train.max_length``;
  the longest item is named otherwise.

Slow checks (indexing lm-eval's registry, tokenising the training data) keep their
verdict in ``{cache_dir}/checks/``, keyed by what they read, so a repeated parse is fast.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.adapters import BudgetError, OptionError, PluginError, UnknownMethodError
from harness.data.jsonl import DataError, load_jsonl
from harness.data.prepare import load_general_text
from harness.data.prompts import training_texts
from harness.data.tasks import training_data_digest, training_items
from harness.model.load import ModelSourceError, cache_root, load_tokenizer, resolve_model
from harness.model.lower_cache import model_fingerprint
from harness.model.tokens import encode_pair
from harness.plan.config import ConfigError
from harness.plan.study import plan_study

#: what an lm-eval task file name allows (the data step writes one YAML per task)
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


class PreflightError(ValueError):
    """One or more checks failed; the message lists every failure."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


# -- data -------------------------------------------------------------------------------------


def check_out_dir(config: dict[str, Any]) -> str:
    """``out_dir`` is a folder this user can write (or can be created)."""
    out = Path(config["out_dir"])
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out_dir {str(out)!r} is a file, not a folder; choose another out_dir")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(
            f"out_dir {str(out)!r} cannot be written ({str(probe)!r} is read-only for this user); "
            "choose a writable out_dir or fix the folder's permissions"
        )
    return str(out)


def check_data(config: dict[str, Any]) -> str:
    """Validate the data files (JSONL source) or names (lm-eval source); returns a summary."""
    data = config["data"]
    general = config["eval"].get("general_text")
    if general:

        load_general_text(general)
    if data["source"] == "generated":
        return "generated suite (deterministic from the config)"
    if data["source"] == "lm_eval":
        check_lm_eval_tasks(config, data["tasks"], "data.tasks", data.get("include_path"))
        return f"lm-eval train splits of {', '.join(data['tasks'])} (read by the data step)"
    train_path, test_path = Path(data["train"]), Path(data["test"])
    test = load_jsonl(test_path)
    train = load_jsonl(train_path, default_task=test_path.stem)
    train_tasks = list(dict.fromkeys(it["task"] for it in train))
    test_tasks = list(dict.fromkeys(it["task"] for it in test))
    wanted = data.get("tasks")
    if wanted:
        for path, tasks in ((train_path, train_tasks), (test_path, test_tasks)):
            missing = [t for t in wanted if t not in tasks]
            if missing:
                raise DataError(
                    f"data.tasks names {', '.join(map(repr, missing))}, which {path} does not have "
                    f"(tasks there: {', '.join(tasks)})"
                )
        test_tasks = [t for t in test_tasks if t in wanted]
    for task in dict.fromkeys([*train_tasks, *test_tasks]):
        if not TASK_NAME.match(task):
            raise DataError(
                f"task name {task!r} (in {train_path} or {test_path}) cannot name an lm-eval task "
                "file; valid: ASCII letters, digits, '_' and '-', starting with a letter or digit"
            )
    missing = [t for t in test_tasks if t not in train_tasks]
    if missing:
        raise DataError(
            f"{test_path}: test task(s) {', '.join(map(repr, missing))} have no training items in "
            f"{train_path} (training tasks: {', '.join(train_tasks)}); give each test item's "
            "`task` a name the training file uses"
        )
    return f"{len(train)} training and {len(test)} test items, tasks {', '.join(test_tasks)}"


# -- lm-eval's registry -------------------------------------------------------------------------


def _cached(config: dict[str, Any], kind: str, key: Any, compute):
    """``compute()`` once per ``key`` (a JSON-able value); the verdict is kept on disk."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = cache_root(config) / "checks" / f"{kind}-{digest}.json"
    if path.exists():
        try:
            return json.loads(path.read_text())
        except ValueError:
            path.unlink(missing_ok=True)
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def check_lm_eval_tasks(config: dict[str, Any], names: list[str], where: str, include_path=None) -> None:
    """Every name is a task or group lm-eval knows (its registry, plus ``include_path``)."""
    if not names:
        return
    import lm_eval

    def known_names() -> list[str]:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=None if include_path is None else str(include_path))
        return sorted(manager.all_tasks)

    key = {"lm_eval": lm_eval.__version__, "include_path": str(include_path or "")}
    if include_path is not None:  # its YAMLs can change: key on their contents too
        key["files"] = sorted(
            (str(p), hashlib.sha256(p.read_bytes()).hexdigest()[:12]) for p in Path(include_path).rglob("*.yaml")
        )
    known = set(_cached(config, "lm-eval-tasks", key, known_names))
    unknown = [n for n in names if n not in known]
    if unknown:
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
        raise ConfigError(
            f"{where}: lm-eval knows no task {', '.join(hints)}; list the names with "
            "`lm_eval ls tasks`"
        )


# -- model and lengths ----------------------------------------------------------------------


def check_model(config: dict[str, Any]):
    """The base model's folder, found (built or converted once) without any download."""
    return resolve_model(config["model"], cache_root(config))


def longest_training_item(config: dict[str, Any], tokenizer) -> dict[str, Any]:
    """The training item with the most prompt + answer tokens, as training tokenises it."""

    best = {"tokens": 0}
    for number, item in training_items(config["data"]):
        context, answer = encode_pair(tokenizer, *training_texts(item))
        if len(context) + len(answer) > best["tokens"]:
            best = {
                "tokens": len(context) + len(answer),
                "prompt_tokens": len(context),
                "answer_tokens": len(answer),
                "task": item.get("task"),
                "where": number,
            }
    return best


def check_lengths(config: dict[str, Any], source) -> str:
    """Every training item fits ``train.max_length``, or the longest item is named."""

    data = config["data"]
    if data["source"] == "lm_eval":
        return "lm-eval sources are measured by the data step (their items come from the hub)"
    max_length = config["train"]["max_length"]

    def measure() -> dict[str, Any]:
        return longest_training_item(config, load_tokenizer(source))

    key = {"data": training_data_digest(data), "model": model_fingerprint(source.path, "tokenizer")}
    longest = _cached(config, "lengths", key, measure)
    if max_length != "auto" and longest["tokens"] > max_length:
        raise DataError(
            f"train.max_length = {max_length} is shorter than the longest training item: "
            f"{longest['where']} (task {longest['task']!r}) has {longest['prompt_tokens']} prompt + "
            f"{longest['answer_tokens']} answer = {longest['tokens']} tokens. Set train.max_length to "
            f"at least {longest['tokens']}, or to `auto` (the longest item's length)"
        )
    shown = longest["tokens"] if max_length == "auto" else max_length
    return f"longest training item {longest['tokens']} tokens (max_length {shown})"


def check_batches(config: dict[str, Any], plan) -> str:
    """Every run (and component) has at least one full batch of training items (its items
    as the plan counted them, :class:`harness.plan.study.RunSettings`)."""
    batch = config["train"]["batch_size"]
    smallest = None
    for run in plan.training_jobs:
        n, tasks = run.settings.examples, run.settings.tasks
        if n is None:
            continue
        if n < batch:
            raise ConfigError(
                f"train.batch_size = {batch} exceeds the {n} training items of {run.path} "
                f"(tasks {', '.join(tasks) if tasks else 'all'}); lower train.batch_size or give "
                "those tasks more training items"
            )
        smallest = n if smallest is None else min(smallest, n)
    return f"batch {batch}; the smallest run trains on {smallest} items"


# -- all of them ---------------------------------------------------------------------------------


def run_checks(config: dict[str, Any]) -> tuple[list[Check], Any]:
    """Every check, in order; ``(checks, plan or None)``. A failed check does not stop the
    ones that do not depend on it."""

    checks: list[Check] = [Check("config", True, f"study {config['study']!r}, valid")]
    plan = None
    user = (ConfigError, DataError, ModelSourceError, BudgetError, OptionError, PluginError,
            UnknownMethodError, ValueError, FileNotFoundError)
    try:
        detail = check_data(config)
        checks.append(Check("data", True, detail))
        data_ok = True
    except user as exc:
        checks.append(Check("data", False, str(exc)))
        data_ok = False
    try:
        check_lm_eval_tasks(config, list(config["eval"].get("tasks") or []), "eval.tasks",
                            config["eval"].get("include_path"))
        if config["eval"].get("tasks"):
            checks.append(Check("lm-eval tasks", True, ", ".join(config["eval"]["tasks"])))
    except user as exc:
        checks.append(Check("lm-eval tasks", False, str(exc)))
    try:
        checks.append(Check("out_dir", True, check_out_dir(config)))
    except user as exc:
        checks.append(Check("out_dir", False, str(exc)))
    if data_ok:
        try:
            plan = plan_study(config)
            checks.append(Check("methods and budget", True, f"{len(plan.runs)} runs, {len(plan.components)} components"))
        except user as exc:
            checks.append(Check("methods and budget", False, str(exc)))
    if plan is not None and config["data"]["source"] != "lm_eval":
        try:
            checks.append(Check("batches", True, check_batches(config, plan)))
        except user as exc:
            checks.append(Check("batches", False, str(exc)))
    source = None
    try:
        source = check_model(config)
        checks.append(Check("model", True, f"{config['model']['source']} ({source.path})"))
    except user as exc:
        checks.append(Check("model", False, str(exc)))
    if source is not None and data_ok:
        try:
            checks.append(Check("lengths", True, check_lengths(config, source)))
        except user as exc:
            checks.append(Check("lengths", False, str(exc)))
    return checks, plan


#: checks a dry run only warns about: seeing the DAG (say, on a cluster's login node before
#: the weights are downloaded) needs neither the model nor its tokenizer
DRY_RUN_WARNINGS = ("model", "lengths")


def assert_ready(config: dict[str, Any], dry_run: bool = False):
    """The study's plan when every check passes; else :class:`PreflightError` listing
    every failed check. With ``dry_run``, a failed model or lengths check is printed as a
    warning instead."""
    checks, plan = run_checks(config)
    failed = [c for c in checks if not c.ok]
    if dry_run:
        for c in [c for c in failed if c.name in DRY_RUN_WARNINGS]:
            print(f"harness: warning (dry run only; a real run stops here): {c.name}: {c.detail}",
                  file=sys.stderr)
        failed = [c for c in failed if c.name not in DRY_RUN_WARNINGS]
    if failed:
        lines = "\n".join(f"- {c.name}: {c.detail}" for c in failed)
        raise PreflightError(f"the study cannot run; {len(failed)} check(s) failed:\n{lines}")
    return plan
