"""Where every run of a study stands, read from its folders (nothing here changes a file).

:func:`study_status` reads the run folders (nothing is changed) and says, per run and
component: ``done``, ``flagged`` (done and used, with a note: trained under other engine
code than this checkout's, or before the harness recorded its code), ``missing`` (never
started), ``interrupted`` (a checkpoint to resume from), ``failed`` (its job log holds an
error), ``corrupt`` (a result file that is not valid JSON, lacks a required field, differs
from the digest its writer recorded, holds fewer per-item scores than the test set has
items, or belongs to another run), ``stale`` (trained or scored on data files other than
the data folder records, on test data that has changed since, or by method or toolkit code
that changed since), or ``no weights`` (finished, weights not here: only needed to
evaluate again), with the command that fixes it and the reason. A damaged data folder
(a file that differs from its recorded digest) and a damaged summary, table or figure are
listed too. Folders under ``runs/`` that the config no longer defines are listed as ``not
in the study``.

:func:`invalid_files` names the result files a job must not build on: corrupt, stale, of
another run, or a score without its training record, each with the name it is moved to
(``<file>.<why>-<digest8>``, by content, so a dry run and the real run agree). The
Snakefile's input functions ask for those names: ``snakemake -n`` then lists a
``set_aside`` job (which moves the file, never deletes it) and the job that redoes the
result, and the real run does exactly that.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.common.manifest import (
    VerificationError,
    check_files,
    data_record,
    manifest_digests,
    missing_fields,
)
from harness.data.tasks import test_data_digest, training_data_digest
from harness.plan.study import code_identity, declared_equivalent, read_rates, row_key


@dataclass
class RunState:
    run_id: str
    path: str  # relative to out_dir
    state: str
    detail: str = ""
    fix: str = ""


def _read(path: Path) -> dict[str, Any] | str | None:
    """The JSON object in ``path``; ``None`` if absent; an error string if unreadable."""
    if not path.exists():
        return None
    try:
        value = json.loads(path.read_text())
    except (ValueError, OSError) as exc:
        return f"not valid JSON ({exc})"
    return value if isinstance(value, dict) else "not a JSON object"


def _last_error(log: Path) -> str | None:
    if not log.exists():
        return None
    lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
    for line in reversed(lines[-40:]):
        if line.startswith("error:") or "Error" in line.split(":", 1)[0]:
            return line.strip()[:300]
    return None


def _checkpoint_step(run_dir: Path) -> int | None:
    state = run_dir / "checkpoints" / "last" / "train_log.jsonl"
    if not state.exists():
        return None
    lines = [line for line in state.read_text().splitlines() if line.strip()]
    return len(lines)


def study_status(plan, config_path: str = "<config>") -> list[RunState]:
    """Every run and component of ``plan`` with its state and the command that fixes it."""
    out: list[RunState] = []
    snake = f"snakemake --cores 2 --configfile {config_path}"
    data = invalid_data_summary(plan.config, plan)
    if data is not None:
        out.append(RunState("data", "data", "stale" if data[1] == "stale" else "corrupt",
                            f"{data[2]} (the next snakemake moves data_summary.json aside and writes "
                            "the data folder again)", snake))
    for path, _, detail in invalid_outputs(plan):
        rel = path.relative_to(plan.out_dir).as_posix()
        out.append(RunState(rel, rel, "corrupt", f"{detail} (the next snakemake moves it aside)", snake))
    for run in [*plan.components, *plan.tuning, *plan.runs]:
        run_dir = plan.run_dir(run)
        log_dir = plan.out_dir / "logs" / (
            "tune" if run.is_tuning else "components" if run.is_component else "train"
        )
        train = None if run.is_base else _read(run_dir / "train.json")
        metrics = None if run.is_component else _read(run_dir / "metrics.json")
        state = RunState(run.run_id, run.path, "done")
        invalid = invalid_files(plan, run)
        if invalid:
            path, why, detail = invalid[0]
            state.state = "stale" if why == "stale" else "corrupt"
            state.detail = detail + f" (the next snakemake moves {path.name} aside and redoes it)"
            state.fix = snake
        elif train is None and not run.is_base:
            step = _checkpoint_step(run_dir)
            error = _last_error(log_dir / f"{run.run_id}.log")
            if step is not None:
                state.state, state.detail = "interrupted", f"checkpoint at step {step}: resumes from there"
            elif error:
                state.state, state.detail = "failed", f"{error} (log: {log_dir / (run.run_id + '.log')})"
            else:
                state.state = "missing"
            state.fix = f"{snake}   # or: python -m harness train --config {config_path} --run {run.run_id}"
        elif metrics is None and not run.is_component:
            error = _last_error(plan.out_dir / "logs" / "evaluate" / f"{run.run_id}.log")
            state.state = "failed" if error else "missing"
            state.detail = ("not evaluated" if run.is_base else "trained, not evaluated") + (
                f": {error}" if error else ""
            )
            state.fix = f"{snake}   # or: python -m harness evaluate --config {config_path} --run {run.run_id}"
        elif not run.is_base and not (run_dir / "adapter" / "adapter.safetensors").exists():
            state.state = "no weights"
            state.detail = "finished; weights are not here (never committed); needed only to evaluate again"
            state.fix = f"python -m harness restore --config {config_path} --run {run.run_id}"
        if state.state in ("done", "no weights") and isinstance(train, dict):
            notes = code_notes(train, run)
            if notes and state.state == "done":
                state.state = "flagged"  # done and used; the note says what to know about it
            for note in notes:
                state.detail = (state.detail + "; " if state.detail else "") + note
        out.append(state)
    known = {r.run_id for r in plan.runs}
    runs_dir = plan.out_dir / "runs"
    if runs_dir.is_dir():
        for folder in sorted(p for p in runs_dir.iterdir() if p.is_dir() and p.name not in known):
            out.append(
                RunState(folder.name, f"runs/{folder.name}", "not in the study",
                         "a run of an earlier version of the config (kept, never overwritten)",
                         "nothing to do; delete the folder by hand if it is obsolete")
            )
    return out


def _digest8(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def aside_name(path: Path, why: str) -> Path:
    """Where an invalid file goes: next to it, ``<name>.<why>-<sha256 of its content, 8>``."""
    return path.with_name(f"{path.name}.{why}-{_digest8(path)}")


def _stale_code(plan, run, train: dict[str, Any]) -> str | None:
    """Why a run's training is stale because code that shapes its numbers changed since it
    trained (``None``: it is not): its method's files (built-in or plugin, one rule:
    :func:`harness.plan.study.method_source`) or the toolkit ``harness.adapters``. A run
    that recorded no digest (trained before the harness recorded it) is not checked here:
    :func:`code_notes` flags it."""
    recorded = (train.get("method_source") or {}).get("digest")
    current = getattr(run, "method_source", None) or {}
    if (recorded is not None and current.get("digest") and recorded != current["digest"]
            and not _declared(recorded, current["digest"], "method", run.method)):
        return f"the code of method {run.method!r} changed since it trained ({', '.join(current['files'])})"
    toolkit = ((train.get("code") or {}).get("toolkit") or {}).get("digest")
    now = code_identity()["toolkit"]
    if toolkit is not None and toolkit != now["digest"] and not _declared(toolkit, now["digest"], "toolkit"):
        return f"the toolkit {now['package']} changed since it trained (recorded {toolkit}, now {now['digest']})"
    return None


def engine_code(train: dict[str, Any] | None) -> str | None:
    """The provenance table's ``engine_code`` of a run: ``this checkout's``, ``other: <the
    engine files that differ>`` or ``not recorded`` (trained before the harness recorded it);
    ``None`` for the untrained base model."""
    if not train:
        return None
    files = ((train.get("code") or {}).get("engine") or {}).get("files")
    if not files:
        return "not recorded"
    now = code_identity()["engine"]["files"]
    changed = sorted(f for f in set(now) | set(files) if now.get(f) != files.get(f))
    return f"other: {', '.join(changed)}" if changed else "this checkout's"


def _declared(recorded: str, current: str, kind: str, name: str | None = None) -> str | None:
    """The reason :data:`harness.plan.study.NUMBER_PRESERVING` gives for counting code with
    digest ``recorded`` as today's ``current`` (``None``: no declaration covers it)."""
    entry = declared_equivalent(kind, name)
    if entry and entry["to"] == current and recorded in entry["from"]:
        return str(entry["why"])
    return None


def code_notes(train: dict[str, Any], run=None) -> list[str]:
    """What ``status`` and the provenance table flag about the code a finished run trained
    under, without redoing it: method or toolkit code that changed but is declared number-
    preserving (:data:`harness.plan.study.NUMBER_PRESERVING`), no toolkit/engine digest
    recorded (trained before the harness recorded them), or engine modules
    (:data:`harness.plan.study.ENGINE_MODULES`) that differ from this checkout's."""
    notes = []
    recorded = (train.get("method_source") or {}).get("digest")
    current = (getattr(run, "method_source", None) or {}).get("digest")
    if run is not None and recorded and current and recorded != current:
        why = _declared(recorded, current, "method", run.method)
        if why:
            notes.append(f"method code changed since it trained, declared number-preserving: {why}")
    code = train.get("code")
    if not isinstance(code, dict) or not (code.get("engine") or {}).get("files"):
        return [*notes, "trained before the harness recorded its toolkit and engine code (not checked)"]
    toolkit, now_toolkit = (code.get("toolkit") or {}).get("digest"), code_identity()["toolkit"]["digest"]
    if toolkit and toolkit != now_toolkit and (why := _declared(toolkit, now_toolkit, "toolkit")):
        notes.append(f"toolkit code changed since it trained, declared number-preserving: {why}")
    now = code_identity()["engine"]["files"]
    then = code["engine"]["files"]
    changed = sorted(f for f in set(now) | set(then) if now.get(f) != then.get(f))
    if changed:
        return [*notes, f"trained under other engine code than this checkout's ({', '.join(changed)}): "
                "recorded, not redone; its numbers are not comparable with runs of this code "
                "unless the change is known to preserve numbers"]
    return notes


def _stale_rate(plan, run, train: dict[str, Any]) -> str | None:
    """Why a tuned run's training is stale because the tune stage now chooses another rate
    than the one it trained at (``None``: it is not, or there is no choice yet). The rate
    is not in the run's id (the tune stage's grid, split and rule are), so this is how a
    choice that moved (tuning runs redone elsewhere) reaches the runs built on it."""
    if not getattr(run, "tuned", False):
        return None
    trained = (train.get("settings") or {}).get("lr")
    chosen = read_rates(plan.config).get(row_key(run.method, run.tag))
    if trained is None or chosen is None or abs(float(trained) - chosen) <= 1e-12 * chosen:
        return None
    return f"trained at lr {trained:g}, but the tune stage now chooses {chosen:g} (tuning/rates.json)"


def _expected_items(plan, run, summary: dict[str, Any] | None) -> dict[str, int]:
    """Per task, how many items a score of ``run`` must hold: the test set's count (the
    validation split's for a tune-stage run), capped by ``eval.limit`` as lm-eval caps it
    (a whole number of items, or a fraction of them rounded up). Empty when the data step
    does not know the items (lm-eval registry tasks)."""
    if not isinstance(summary, dict):
        return {}
    counts = ((summary.get("tune") or {}).get("validation_counts") if run.is_tuning
              else summary.get("test_counts")) or {}
    limit = plan.config["eval"].get("limit")
    if limit is None:
        return dict(counts)
    return {t: min(n, math.ceil(n * limit) if limit < 1.0 else int(limit)) for t, n in counts.items()}


def _short_items(metrics: dict[str, Any], expected: dict[str, int]) -> str | None:
    """How the per-item scores of ``metrics`` fall short of the test set (``None``: they do
    not): a task without them, or a metric with another number of items."""
    items = metrics.get("items") if isinstance(metrics.get("items"), dict) else {}
    for task, n in expected.items():
        by_metric = items.get(task)
        if not isinstance(by_metric, dict) or not by_metric:
            return f"metrics.json has no per-item scores of task {task!r} (its test set has {n} items)"
        for name, values in by_metric.items():
            if not hasattr(values, "__len__") or len(values) != n:
                found = len(values) if hasattr(values, "__len__") else values
                return (f"metrics.json holds {found} per-item {name} scores of task {task!r}, "
                        f"its test set has {n} items")
    return None


def _changed_inputs(recorded: dict[str, str] | None, data: dict[str, str], what: str) -> str | None:
    """Why a result is stale because a data file it read now has another recorded digest
    (``recorded``: ``{path relative to out_dir: sha256}``; ``data``: the data folder's record)."""
    for path, digest in sorted((recorded or {}).items()):
        now = data.get(path.removeprefix("data/"))
        if now is not None and now != digest:
            return f"{what} {path} with sha256 {digest}; the data folder now records {now}"
    return None


def invalid_files(plan, run) -> list[tuple[Path, str, str]]:
    """``(file, why, detail)`` for every result file of ``run`` that its job must redo before
    anything builds on it, each named with the reason:

    * ``corrupt``: not valid JSON, a required field missing (:data:`harness.common.manifest.
      REQUIRED_FIELDS`), content that differs from the digest its writer recorded in the
      run's ``manifest.json``, or per-item scores of another length than the test set;
    * ``foreign``: another run's;
    * ``stale``: trained on another ``train.jsonl`` or scored on other test files than the
      data folder now records, scored on test data that has changed since, trained by method
      or toolkit code that changed since (:func:`_stale_code`), or at another rate than the
      tune stage now chooses;
    * ``orphan``: a score without the valid training record it belongs to."""
    run_dir = plan.run_dir(run)
    out: list[tuple[Path, str, str]] = []
    train_path, metrics_path = run_dir / "train.json", run_dir / "metrics.json"
    train = None if run.is_base else _read(train_path)
    metrics = None if run.is_component else _read(metrics_path)
    try:
        recorded = manifest_digests(run_dir) or {}
        unreadable = None
    except VerificationError as exc:
        recorded, unreadable = {}, str(exc)
    data_dir = plan.out_dir / "data"
    data = data_record(data_dir)

    def damaged(name: str) -> str | None:
        if unreadable:
            return unreadable
        bad = check_files(run_dir, recorded, [name])
        return f"{bad[0].describe()} (its manifest)" if bad else None

    if isinstance(train, str):
        out.append((train_path, "corrupt", f"train.json: {train}"))
    elif isinstance(train, dict) and (lacks := missing_fields(train, "train.json")):
        out.append((train_path, "corrupt", f"train.json lacks required field(s) {', '.join(lacks)}"))
    elif isinstance(train, dict) and train.get("run_id") != run.run_id:
        out.append((train_path, "foreign", f"train.json belongs to run {train.get('run_id')!r}"))
    elif isinstance(train, dict) and (why := damaged("train.json") or damaged("train_log.jsonl")):
        out.append((train_path, "corrupt", why))
    elif isinstance(train, dict) and (why := _changed_inputs(train.get("inputs"), data, "trained on")
                                      or _stale_code(plan, run, train) or _stale_rate(plan, run, train)):
        out.append((train_path, "stale", why))
    if isinstance(metrics, str):
        out.append((metrics_path, "corrupt", f"metrics.json: {metrics}"))
    elif isinstance(metrics, dict):
        digest = test_data_digest(plan.config)
        lacks = missing_fields(metrics, "metrics.json")
        if lacks:
            out.append((metrics_path, "corrupt", f"metrics.json lacks required field(s) {', '.join(lacks)}"))
        elif metrics.get("run_id") != run.run_id:
            out.append((metrics_path, "foreign", f"metrics.json belongs to run {metrics.get('run_id')!r}"))
        elif why := damaged("metrics.json"):
            out.append((metrics_path, "corrupt", why))
        elif digest and not run.is_tuning and metrics.get("test_data") != digest:
            out.append((metrics_path, "stale", "scored on test data that has changed since"))
        elif why := _changed_inputs((metrics.get("inputs") or {}).get("data"), data, "scored on"):
            out.append((metrics_path, "stale", why))
        elif why := _short_items(metrics, _expected_items(plan, run, _read(data_dir / "data_summary.json"))):
            out.append((metrics_path, "corrupt", why))
        elif not run.is_base and (out or train is None):
            out.append((metrics_path, "orphan", "a score without a valid train.json: scored again"))
    return out


def damaged_data(config: dict[str, Any], plan=None) -> tuple[Path, str, str] | None:
    """The data folder's summary when a file the data step recorded (its manifest, or the
    ``sha256`` map of an older ``data_summary.json``) no longer has that content: the detail
    names the file, both digests and the runs that read it; the data rule then writes the
    folder again from the config's source (and a result built on other bytes than it then
    records is stale)."""
    data_dir = Path(config["out_dir"]) / "data"
    bad = check_files(data_dir, data_record(data_dir))
    if not bad:
        return None
    first = bad[0]
    rel = first.path.relative_to(data_dir).as_posix()
    if plan is None:
        affected = "every run of the study"
    else:
        if rel.startswith("tune/"):
            runs = plan.tuning
        elif rel in ("train.jsonl",):
            runs = plan.training_jobs
        elif rel.startswith("tasks/"):
            runs = [*plan.runs, *plan.tuning]
        else:
            runs = [*plan.training_jobs, *[r for r in plan.runs if r.is_base]]
        names = [r.run_id for r in runs]
        affected = (f"{len(names)} run(s): " + ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")
                    if names else "no run")
    more = f" (and {len(bad) - 1} more file(s))" if len(bad) > 1 else ""
    return (data_dir / "data_summary.json", "corrupt",
            f"data/{rel}: recorded sha256 {first.recorded}, "
            + ("the file is missing" if first.found is None else f"found {first.found}")
            + f"{more}; it affects {affected}. Never used: the data step writes the data again")


def invalid_data_summary(config: dict[str, Any], plan=None) -> tuple[Path, str, str] | None:
    """The data folder's summary when it is corrupt, when a data file no longer has the
    content the data step recorded (:func:`damaged_data`; ``plan`` names the runs it
    affects), or when it describes other data than the config's (the data rule then writes
    it again)."""
    path = Path(config["out_dir"]) / "data" / "data_summary.json"
    summary = _read(path)
    if isinstance(summary, str):
        return path, "corrupt", f"data_summary.json: {summary}"
    if summary is not None and (found := damaged_data(config, plan)):
        return found
    if isinstance(summary, dict) and config["data"]["source"] != "lm_eval":
        if summary.get("train_content") not in (None, training_data_digest(config["data"])):
            return path, "stale", "the training data changed"
        if summary.get("test_content") not in (None, test_data_digest(config)):
            return path, "stale", "the test data changed"
        if bool(config["eval"].get("general_text")) != bool(summary.get("general_text")):
            return path, "stale", "eval.general_text changed"
        tune, written = config.get("tune"), summary.get("tune")
        if bool(tune) != bool(written) or (tune and (
                written.get("validation_fraction"), written.get("seed")) != (tune["validation_fraction"], tune["seed"])):
            return path, "stale", "the tune stage's validation split changed"
    return None


#: the study-level outputs (``out_dir``) whose writers record them in ``out_dir/manifest.json``
OUTPUT_GROUPS = {"summary": ("summary.csv", "summary.md"), "tables": ("tables/",), "figures": ("figures/",)}


def invalid_outputs(plan, group: str | None = None) -> list[tuple[Path, str, str]]:
    """``(file, "corrupt", detail)`` for every summary, table or figure file (of ``group``,
    a key of :data:`OUTPUT_GROUPS`; default all) that must be rebuilt although it is there:
    its content differs from the digest its writer recorded in ``out_dir/manifest.json``, or
    ``summary.csv`` does not list exactly the study's runs (also checked for a folder
    written before manifests). The rules then rebuild it (its set-aside name is their input)."""
    out_dir = plan.out_dir
    prefixes = [p for g, ps in OUTPUT_GROUPS.items() if group in (None, g) for p in ps]
    try:
        recorded = manifest_digests(out_dir) or {}
    except VerificationError:
        recorded = {}
    out = []
    for rel, digest in sorted(recorded.items()):
        if not any(rel == p or (p.endswith("/") and rel.startswith(p)) for p in prefixes):
            continue
        path = out_dir / rel
        if path.is_file():
            bad = check_files(out_dir, {rel: digest})
            if bad:
                out.append((path, "corrupt", f"{bad[0].describe()} (out_dir manifest): rebuilt"))
    summary = out_dir / "summary.csv"
    if "summary.csv" in prefixes and summary.is_file() and all(p != summary for p, _, _ in out):
        why = _summary_rows(summary, [r.run_id for r in plan.runs])
        if why:
            out.append((summary, "corrupt", why))
    return out


def _summary_rows(path: Path, run_ids: list[str]) -> str | None:
    """Why ``summary.csv`` is not the study's (``None``: it lists exactly ``run_ids``)."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return f"summary.csv cannot be read ({exc}): rebuilt"
    found = [row.get("run_id") for row in rows]
    if sorted(found, key=str) != sorted(run_ids):
        return (f"summary.csv lists {len(found)} row(s), the study has {len(run_ids)} run(s)"
                + (f" (missing: {', '.join(sorted(set(run_ids) - set(found))[:3])})"
                   if set(run_ids) - set(found) else "") + ": rebuilt")
    return None


def assert_results_valid(plan) -> None:
    """What the summary, tables and figures check before they read a run's results: raise
    :class:`harness.common.manifest.VerificationError` naming every invalid result file
    (:func:`invalid_files`) and a damaged data folder (:func:`damaged_data`), with why."""
    problems = [f"{path}: {detail}" for run in [*plan.components, *plan.tuning, *plan.runs]
                for path, _, detail in invalid_files(plan, run)]
    data = damaged_data(plan.config, plan)
    if data is not None:
        problems.insert(0, data[2])
    if problems:
        raise VerificationError(
            f"{len(problems)} result file(s) of study {plan.config['study']!r} are not valid and are "
            "never used:\n- " + "\n- ".join(problems)
            + "\nRun snakemake (it sets them aside and redoes them) or see `python -m harness status`."
        )


def engine_mix(plan) -> str | None:
    """Why the study's finished runs cannot be compared with each other: they recorded more
    than one engine digest (``code.engine.digest`` in ``train.json``; a digest declared
    number-preserving for today's engine in ``number_preserving.yaml`` counts as today's).
    ``None`` when every run that recorded one recorded the same; runs trained before the
    harness recorded it are flagged by ``status``, not counted here."""
    today = code_identity()["engine"]["digest"]
    declared = declared_equivalent("engine")
    groups: dict[str, list[str]] = {}
    for run in plan.trained_runs:
        train = _read(plan.run_dir(run) / "train.json")
        digest = ((train.get("code") or {}).get("engine") or {}).get("digest") if isinstance(train, dict) else None
        if digest is None:
            continue
        if declared and declared["to"] == today and digest in declared["from"]:
            digest = today
        groups.setdefault(digest, []).append(run.run_id)
    if len(groups) <= 1:
        return None
    parts = "; ".join(
        f"{'today' if d == today else d[:16]}: {len(ids)} run(s), e.g. {ids[0]}" for d, ids in sorted(groups.items())
    )
    return (
        f"the runs of study {plan.config.get('study')!r} were trained under {len(groups)} different "
        f"engine codes ({parts}); comparing them is refused. Move the older runs' folders aside "
        "so snakemake redoes them, or declare the engine change number-preserving "
        "(scripts/declare_number_preserving.py) after a test retrains one run to identical metrics."
    )
