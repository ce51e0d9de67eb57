"""Everything a study needs, checked before any job starts.

``python -m harness check --config FILE`` runs the checks and exits 0 only when the study
can run; the Snakefile runs the same checks when it is read, so ``snakemake`` (``-n``
included) stops with one message before any job starts:

* **config**: the schema (key path, bad value, what is allowed) and its semantics;
* **methods and budget**: plugins import, method names exist, every budget is feasible;
* **data**: local JSONL files line by line (file, line, field, what is valid), the task
  selection, and every test task present in the training data;
* **hygiene**: repeated test items and ids refused, training items that are test items
  refused unless ``data.allow_overlap`` (:mod:`harness.data.hygiene`; repeated training
  items are a warning);
* **lm-eval tasks**: ``eval.tasks`` (and ``data.tasks`` of ``data.source: lm_eval``) are
  names lm-eval's registry knows, with a "did you mean" for a near miss;
* **eval data**: every task of ``eval.tasks`` loads its evaluation documents, as the
  scoring job will (:mod:`harness.plan.eval_data`), or the task and the reason are named;
* **model**: the base model can be found without downloading anything;
* **run names**: every run and component folder's path is made of plain names;
* **lengths**: every training item (prompt + answer tokens) fits the model's context
  (:func:`harness.model.load.model_context`) and ``train.max_length``; every test item
  (prompt + its longest choice, as lm-eval scores it) fits the context and the scoring
  window; the items that do not are named by file and line.

Slow checks (indexing lm-eval's registry, tokenising the training data) keep their
verdict in ``{cache_dir}/checks/``, keyed by what they read, so a repeated parse is fast.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from harness.adapters import BudgetError, OptionError, PluginError, UnknownMethodError
from harness.data.hygiene import data_hygiene
from harness.data.jsonl import DataError
from harness.data.prepare import load_general_text
from harness.data.prompts import build_prompt, continuation, training_texts
from harness.data.sources import is_generation, read_items
from harness.data.tasks import task_digests, test_items, training_data_digest, training_items
from harness.model.load import (
    ModelSourceError,
    cache_root,
    load_tokenizer,
    model_context,
    resolve_model,
)
from harness.model.lower_cache import model_fingerprint
from harness.model.tokens import SCORING_WINDOW, encode_pairs
from harness.plan.check_cache import cached
from harness.plan.config import ConfigError
from harness.plan.eval_data import check_eval_data
from harness.plan.study import plan_study

#: what an lm-eval task file name allows (the data step writes one YAML per task)
TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
#: one segment of a run or component folder's path (``<group>/<run id>``)
PATH_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
#: items over a limit named in full by the lengths check; the rest are counted
SHOWN_ITEMS = 5


class PreflightError(ValueError):
    """One or more checks failed; the message lists every failure."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    #: findings that do not stop the study, printed with it
    warnings: list[str] = field(default_factory=list)


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
    # files (JSONL, CSV, parquet, save_to_disk) or a datasets dataset, through data.fields
    train_path, test_path = (
        (Path(data["train"]), Path(data["test"])) if data["source"] != "hub"
        else tuple(f"{data['dataset']} split {data.get(s) or s}" for s in ("train", "test"))
    )
    test = [item for _, item in read_items(data, "test")]
    train = [item for _, item in read_items(data, "train")]
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
    generation = [t for t in test_tasks if any(is_generation(it) for it in test if it["task"] == t)]
    return (f"{len(train)} training and {len(test)} test items, tasks {', '.join(test_tasks)}"
            + (f" (generation, scored by exact match: {', '.join(generation)})" if generation else ""))


def check_hygiene(config: dict[str, Any]) -> Check:
    """Repeated items and ids, and training items that are test items, as
    :func:`harness.data.hygiene.data_hygiene` judges them (generated and JSONL sources)."""
    data = config["data"]
    found = data_hygiene(training_items(data), test_items(data), bool(data.get("allow_overlap")))
    if found.errors:
        return Check("hygiene", False, "\n  ".join(found.errors), found.warnings)
    detail = "test items and ids unique, training items none of the test items"
    if found.warnings:
        detail = f"nothing refused; {len(found.warnings)} warning(s)"
    return Check("hygiene", True, detail, found.warnings)


def check_run_names(plan) -> str:
    """Every run and component folder's path is made of plain names (a plugin's variant tag
    is part of the run's name; braces or a slash there would break the workflow's file
    patterns)."""
    for run in [*plan.training_jobs, *plan.runs]:
        bad = [part for part in run.path.split("/") if not PATH_SEGMENT.match(part)]
        if bad:
            raise ConfigError(
                f"run folder {run.path!r} (method {run.method!r}, variant tag {run.tag!r}) has "
                f"{', '.join(map(repr, bad))}, not a plain name: a method's variant tags may use "
                "ASCII letters, digits, '.', '_' and '-' only (no '/', braces or spaces)"
            )
    return f"{len({r.path for r in [*plan.training_jobs, *plan.runs]})} run and component folders"


# -- lm-eval's registry -------------------------------------------------------------------------


def check_lm_eval_tasks(config: dict[str, Any], names: list[str], where: str, include_path=None) -> None:
    """Every name is a task or group lm-eval knows (its registry, plus ``include_path``)."""
    if not names:
        return
    import lm_eval

    if include_path is not None and Path(include_path).is_dir():
        from lm_eval.tasks import TaskManager

        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(n in local.all_tasks for n in names):
            return  # all found without indexing the registry (a second, not half a minute)

    def known_names() -> list[str]:
        from lm_eval.tasks import TaskManager

        manager = TaskManager(include_path=None if include_path is None else str(include_path))
        return sorted(manager.all_tasks)

    key = {"lm_eval": lm_eval.__version__, "include_path": str(include_path or "")}
    if include_path is not None:  # its YAMLs can change: key on their contents too
        key["files"] = sorted(
            (str(p), hashlib.sha256(p.read_bytes()).hexdigest()[:12]) for p in Path(include_path).rglob("*.yaml")
        )
    known = set(cached(config, "lm-eval-tasks", key, known_names))
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


def _tokenizer_files_digest(path: Path) -> str:
    """The tokenizer's own files (the model fingerprint covers config and weights only)."""
    h = hashlib.sha256()
    for f in sorted(path.glob("*")):
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "added_tokens"))
                            or f.suffix == ".model"):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def measure_items(config: dict[str, Any], source) -> dict[str, Any]:
    """The token counts the lengths check judges, as training and lm-eval tokenise: the
    model's context (:func:`harness.model.load.model_context`) and the scoring window; the
    longest training item (prompt + answer) and test item (prompt + its longest choice);
    the items over the context (training) or over the context or window (test, which lm-eval
    scores as prompt + choice minus its last token), at most :data:`SHOWN_ITEMS` of each
    kind named, with their counts."""
    tokenizer = load_tokenizer(source)
    context, context_from = model_context(source, tokenizer)
    window = SCORING_WINDOW if context is None else min(context, SCORING_WINDOW)
    out: dict[str, Any] = {"context": context, "context_from": context_from, "window": window}
    longest, over = {"tokens": 0}, []
    items = training_items(config["data"])
    for (where, item), (prompt, answer) in zip(items, encode_pairs(tokenizer, [training_texts(it) for _, it in items])):
        tokens = len(prompt) + len(answer)
        record = {"where": where, "task": item.get("task"), "tokens": tokens,
                  "prompt_tokens": len(prompt), "answer_tokens": len(answer)}
        if tokens > longest["tokens"]:
            longest = record
        if context is not None and tokens > context:
            over.append(record)
    out.update(longest_train=longest, train_over=over[:SHOWN_ITEMS], train_over_count=len(over))
    # what lm-eval scores of a test item: the prompt and each choice; a generation item's
    # prompt and the answer it is to generate
    items = test_items(config["data"])
    pairs = [([(build_prompt(it), continuation(c)) for c in it["choices"]] if "choices" in it
              else [training_texts(it)]) for _, it in items]
    encoded = iter(encode_pairs(tokenizer, [pair for group in pairs for pair in group]))
    longest, over = {"tokens": 0}, []
    for (where, item), group in zip(items, pairs):
        best = None
        for i in range(len(group)):
            prompt, answer = next(encoded)
            if best is None or len(prompt) + len(answer) > best["tokens"]:
                best = {"where": where, "task": item.get("task"), "tokens": len(prompt) + len(answer),
                        "prompt_tokens": len(prompt), "answer_tokens": len(answer), "choice": i}
        if best["tokens"] > longest["tokens"]:
            longest = best
        if best["tokens"] - 1 > window:  # lm-eval feeds (prompt + choice)[:-1]
            over.append(best)
    out.update(longest_test=longest, test_over=over[:SHOWN_ITEMS], test_over_count=len(over))
    return out


def _named(items: list[dict[str, Any]], count: int, what: str) -> str:
    shown = "; ".join(
        f"{it['where']} (task {it['task']!r}): {it['prompt_tokens']} prompt + {it['answer_tokens']} "
        f"{what} = {it['tokens']} tokens" for it in items
    )
    return shown + (f"; and {count - len(items)} more" if count > len(items) else "")


def check_lengths(config: dict[str, Any], source) -> str:
    """Every training item fits the model's context and ``train.max_length`` (``auto``: the
    longest item, never past the context); every test item, as lm-eval scores it, fits the
    context and the scoring window. Otherwise the items are named by file and line, and a
    suggested ``max_length`` is never past the context."""

    data = config["data"]
    if data["source"] == "lm_eval":
        return "lm-eval sources are measured by the data step (their items come from the hub)"
    max_length = config["train"]["max_length"]
    key = {
        "version": 2,
        "train": training_data_digest(data),
        "test": task_digests(test_items(data)),
        "model": model_fingerprint(source.path, "tokenizer"),
        "tokenizer": _tokenizer_files_digest(source.path),
        "window": SCORING_WINDOW,
    }
    m = cached(config, "lengths", key, lambda: measure_items(config, source))
    context, longest, errors = m["context"], m["longest_train"], []
    limit = f"the model's context of {context} tokens ({m['context_from']})"
    if m["train_over_count"]:
        errors.append(
            f"{m['train_over_count']} training item(s) longer than {limit}: "
            f"{_named(m['train_over'], m['train_over_count'], 'answer')}. No train.max_length "
            f"can hold them (at most {context} for this model): shorten or remove them"
        )
    if m["test_over_count"]:
        why = limit if m["window"] == context else f"the scoring window of {m['window']} tokens"
        errors.append(
            f"{m['test_over_count']} test item(s) longer than {why} as lm-eval scores them "
            f"(prompt + longest choice, less its last token): "
            f"{_named(m['test_over'], m['test_over_count'], 'choice')}; lm-eval would cut their "
            "prompts from the left: shorten or remove them"
        )
    if max_length != "auto" and context is not None and max_length > context:
        errors.append(
            f"train.max_length = {max_length} exceeds {limit}; set it to at most {context}, or "
            "to `auto` (the longest training item's length)"
        )
    elif max_length != "auto" and longest["tokens"] > max_length:
        fits = context is None or longest["tokens"] <= context
        errors.append(
            f"train.max_length = {max_length} is shorter than the longest training item: "
            f"{longest['where']} (task {longest['task']!r}) has {longest['prompt_tokens']} prompt + "
            f"{longest['answer_tokens']} answer = {longest['tokens']} tokens. "
            + (f"Set train.max_length to at least {longest['tokens']}, or to `auto` (the longest "
               "item's length)" if fits else
               f"That item exceeds {limit}, so no max_length can hold it: shorten or remove it, "
               f"then set train.max_length to at most {context} or to `auto`")
        )
    if errors:
        raise DataError("\n  ".join(errors))
    shown = longest["tokens"] if max_length == "auto" else max_length
    within = f"; {limit}" if context is not None else f"; {m['context_from']}"
    return (f"longest training item {longest['tokens']} tokens (max_length {shown}), longest test "
            f"item {m['longest_test']['tokens']} tokens{within}")


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
    if checks[-1].name == "lm-eval tasks" and checks[-1].ok:  # each eval task's data loads
        try:
            checks.append(Check("eval data", True, check_eval_data(config)))
        except user as exc:
            checks.append(Check("eval data", False, str(exc)))
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
    if data_ok and config["data"]["source"] != "lm_eval":
        try:
            checks.append(check_hygiene(config))
        except user as exc:
            checks.append(Check("hygiene", False, str(exc)))
    if plan is not None:
        try:
            checks.append(Check("run names", True, check_run_names(plan)))
        except user as exc:
            checks.append(Check("run names", False, str(exc)))
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
#: the weights and the evaluation datasets are downloaded) needs neither the model, nor its
#: tokenizer, nor the eval tasks' data; a real run stops on them before its first job
DRY_RUN_WARNINGS = ("model", "lengths", "eval data")


def assert_ready(config: dict[str, Any], dry_run: bool = False):
    """The study's plan when every check passes; else :class:`PreflightError` listing
    every failed check. With ``dry_run``, a failed model or lengths check is printed as a
    warning instead."""
    checks, plan = run_checks(config)
    for c in checks:
        for warning in c.warnings:
            print(f"harness: warning ({c.name}): {warning}", file=sys.stderr)
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
