"""Where every run of a study stands, read from its folders (nothing here changes a file).

:func:`study_status` reads the run folders (nothing is changed) and says, per run and
component: ``done``, ``missing`` (never started), ``interrupted`` (a checkpoint to resume
from), ``failed`` (its job log holds an error), ``corrupt`` (a result file that is not
valid JSON or belongs to another run), ``stale`` (evaluated on test data that has changed
since), or ``no weights`` (finished, weights not here: only needed to evaluate again),
with the command that fixes it. Folders under ``runs/`` that the config no longer
defines are listed as ``not in the study``.

:func:`invalid_files` names the result files a job must not build on: corrupt, stale, of
another run, or a score without its training record, each with the name it is moved to
(``<file>.<why>-<digest8>``, by content, so a dry run and the real run agree). The
Snakefile's input functions ask for those names: ``snakemake -n`` then lists a
``set_aside`` job (which moves the file, never deletes it) and the job that redoes the
result, and the real run does exactly that.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.data.tasks import test_data_digest, training_data_digest
from harness.plan.study import read_rates, row_key


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
            note = _builtin_code_note(run, train)
            if note:
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


def _stale_method(plan, run, train: dict[str, Any]) -> str | None:
    """Why a run's training is stale because its plugin's code changed (``None``: it is not).
    Built-in methods are not retrained on a code change (see :func:`method_source`)."""
    recorded = (train.get("method_source") or {}).get("digest")
    current = getattr(run, "method_source", None) or {}
    if recorded is None or not current or current.get("builtin"):
        return None
    if recorded != current.get("digest"):
        return f"the code of method {run.method!r} changed since it trained ({', '.join(current['files'])})"
    return None


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


def _builtin_code_note(run, train: dict[str, Any]) -> str | None:
    recorded = (train.get("method_source") or {}).get("digest")
    current = getattr(run, "method_source", None) or {}
    if recorded and current.get("builtin") and recorded != current.get("digest"):
        return (f"built-in method {run.method!r} changed since this run trained (not redone: "
                "built-ins are held to their numbers by the test suite)")
    return None


def invalid_files(plan, run) -> list[tuple[Path, str, str]]:
    """``(file, why, detail)`` for every result file of ``run`` that its job must redo before
    anything builds on it: ``corrupt`` (not valid JSON), ``foreign`` (another run's),
    ``stale`` (scored on test data that has changed since, trained by a plugin whose code
    changed since, or trained at another rate than the tune stage now chooses), ``orphan`` (a score without the training record it belongs to)."""
    run_dir = plan.run_dir(run)
    out: list[tuple[Path, str, str]] = []
    train_path, metrics_path = run_dir / "train.json", run_dir / "metrics.json"
    train = None if run.is_base else _read(train_path)
    metrics = None if run.is_component else _read(metrics_path)
    if isinstance(train, str):
        out.append((train_path, "corrupt", f"train.json: {train}"))
    elif isinstance(train, dict) and train.get("run_id", run.run_id) != run.run_id:
        out.append((train_path, "foreign", f"train.json belongs to run {train.get('run_id')!r}"))
    elif isinstance(train, dict) and (why := _stale_method(plan, run, train) or _stale_rate(plan, run, train)):
        out.append((train_path, "stale", why))
    if isinstance(metrics, str):
        out.append((metrics_path, "corrupt", f"metrics.json: {metrics}"))
    elif isinstance(metrics, dict):
        digest = test_data_digest(plan.config)
        if metrics.get("run_id", run.run_id) != run.run_id:
            out.append((metrics_path, "foreign", f"metrics.json belongs to run {metrics.get('run_id')!r}"))
        elif digest and metrics.get("test_data") not in (None, digest):
            out.append((metrics_path, "stale", "scored on test data that has changed since"))
        elif not run.is_base and (out or train is None):
            out.append((metrics_path, "orphan", "a score without a valid train.json: scored again"))
    return out


def invalid_data_summary(config: dict[str, Any]) -> tuple[Path, str, str] | None:
    """The data folder's summary when it is corrupt or describes other data than the config's
    (the data rule then writes it again)."""
    path = Path(config["out_dir"]) / "data" / "data_summary.json"
    summary = _read(path)
    if isinstance(summary, str):
        return path, "corrupt", f"data_summary.json: {summary}"
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
