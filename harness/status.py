"""Where every run of a study stands, and keeping Snakemake's view of it honest.

:func:`study_status` reads the run folders (nothing is changed) and says, per run and
component: ``done``, ``missing`` (never started), ``interrupted`` (a checkpoint to resume
from), ``failed`` (its job log holds an error), ``corrupt`` (a result file that is not
valid JSON or belongs to another run), ``stale`` (evaluated on test data that has changed
since), or ``no weights`` (finished, weights not here: only needed to evaluate again),
with the command that fixes it. Folders under ``runs/`` that the config no longer
defines are listed as ``not in the study``.

:func:`repair` runs when the Snakefile is read. It moves corrupt or stale result files
aside (``<name>.corrupt-<time>`` / ``<name>.stale-<time>``: nothing is deleted), forgets the
data folder's summary when the data changed (the data rule then rewrites it), and, when a
result of a finished study is missing, removes the derived outputs (summary, tables,
figures: rebuilt from the run folders in seconds), so the next ``snakemake`` redoes
exactly the missing work instead of saying "Nothing to be done".
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.data.tasks import content_digest, task_digests, test_items, training_data_digest

DERIVED = ("summary.csv", "summary.md", "tables", "figures")


@dataclass
class RunState:
    run_id: str
    path: str  # relative to out_dir
    state: str
    detail: str = ""
    fix: str = ""


def test_data_digest(config: dict[str, Any]) -> str | None:
    """A digest of the test items the evaluation reads (``None``: lm-eval's own splits)."""
    if config["data"]["source"] == "lm_eval":
        return None
    return content_digest(task_digests(test_items(config["data"])))


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
    digest = test_data_digest(plan.config)
    snake = f"snakemake --cores 2 --configfile {config_path}"
    for run in [*plan.components, *plan.runs]:
        run_dir = plan.run_dir(run)
        log_dir = plan.out_dir / "logs" / ("components" if run.is_component else "train")
        train = None if run.is_base else _read(run_dir / "train.json")
        metrics = None if run.is_component else _read(run_dir / "metrics.json")
        state = RunState(run.run_id, run.path, "done")
        if isinstance(train, str):
            state.state, state.detail, state.fix = "corrupt", f"train.json: {train}", snake
        elif isinstance(metrics, str):
            state.state, state.detail, state.fix = "corrupt", f"metrics.json: {metrics}", snake
        elif isinstance(metrics, dict) and metrics.get("run_id", run.run_id) != run.run_id:
            state.state = "corrupt"
            state.detail = f"metrics.json belongs to run {metrics.get('run_id')!r}"
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
        elif isinstance(metrics, dict) and digest and metrics.get("test_data") not in (None, digest):
            state.state = "stale"
            state.detail = "evaluated on test data that has changed since"
            state.fix = snake
        elif not run.is_base and not (run_dir / "adapter" / "adapter.safetensors").exists():
            state.state = "no weights"
            state.detail = "finished; weights are not here (never committed); needed only to evaluate again"
            state.fix = f"python -m harness restore --config {config_path} --run {run.run_id}"
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


def _set_aside(path: Path, why: str, notes: list[str], apply: bool) -> None:
    target = path.with_name(f"{path.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}")
    if not apply:
        notes.append(f"{path} is {why}: a run (not a dry run) moves it aside and redoes its job")
        return
    path.rename(target)
    notes.append(f"{path} is {why}: moved to {target.name}; its job runs again")


def repair(plan, apply: bool = True) -> list[str]:
    """Make the next ``snakemake`` redo exactly what is missing, corrupt or stale (see the
    module docstring); returns one note per change, for the console. ``apply=False`` (a dry
    run) changes nothing and names what a real run would do."""
    notes: list[str] = []
    out = plan.out_dir
    summary = _read(out / "data" / "data_summary.json")
    if isinstance(summary, dict) and plan.config["data"]["source"] != "lm_eval":
        if summary.get("train_content") not in (None, training_data_digest(plan.config["data"])):
            _set_aside(out / "data" / "data_summary.json", "stale", notes, apply)
    elif isinstance(summary, str):
        _set_aside(out / "data" / "data_summary.json", "corrupt", notes, apply)
    lost = False
    for st in study_status(plan):
        run_dir = out / st.path
        if st.state == "corrupt":
            name = "train.json" if st.detail.startswith("train.json") else "metrics.json"
            _set_aside(run_dir / name, "corrupt", notes, apply)
            lost = True
        elif st.state == "stale":
            _set_aside(run_dir / "metrics.json", "stale", notes, apply)
            lost = True
        elif st.state in ("missing", "failed", "interrupted"):
            lost = True
    if lost:
        derived = [name for name in DERIVED if (out / name).exists()]
        if derived and not apply:
            notes.append(
                f"results of study {plan.config['study']!r} are incomplete ({', '.join(st.run_id for st in study_status(plan) if st.state not in ('done', 'no weights', 'not in the study'))}): "
                "a run (not a dry run) rebuilds them and the derived summary, tables and figures"
            )
        elif derived:
            for name in derived:
                path = out / name
                if path.is_dir():
                    for f in path.iterdir():
                        if f.is_file():
                            f.unlink()
                else:
                    path.unlink()
            notes.append(
                f"results of study {plan.config['study']!r} are incomplete: the derived "
                f"{', '.join(derived)} in {out} are rebuilt once the missing runs are done"
            )
    return notes
