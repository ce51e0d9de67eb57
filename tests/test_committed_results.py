"""The committed studies (every results/<config name>/ with runs) are what their configs say
and regenerate from their stored results: every planned run has its results, no stale run
folder is left by a change of run ids, and the committed tables equal the tables rebuilt
now from the stored per-run files (no number in a table is typed in by hand)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: every config whose results are committed (results/<config name>/runs)
#: (results/smoke is never committed: .gitignore)
STUDIES = sorted(
    c.stem for c in (ROOT / "config").glob("*.yaml")
    if c.stem != "smoke" and (ROOT / "results" / c.stem / "runs").is_dir()
)


def _plan(study: str):
    from harness.plan.config import load_config
    from harness.plan.study import plan_study

    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        return plan_study(load_config(f"config/{study}.yaml"))
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module", params=STUDIES)
def committed(request):
    return request.param, _plan(request.param)


def test_every_planned_run_is_committed_and_nothing_else(committed):
    study, plan = committed
    out = ROOT / "results" / study
    runs = {p.name for p in (out / "runs").iterdir() if p.is_dir()}
    planned = {r.run_id for r in plan.runs}
    assert runs == planned, (sorted(runs - planned), sorted(planned - runs))
    for run in plan.runs:
        folder = out / "runs" / run.run_id
        assert (folder / "metrics.json").exists() and (folder / "run.json").exists(), run.run_id
        if not run.is_base:
            assert (folder / "train.json").exists(), run.run_id
    components = {p.relative_to(out).as_posix() for p in out.glob("*/*") if (p / "run.json").exists()} - {
        f"runs/{r}" for r in runs
    }
    assert components == {str(c.path) for c in plan.components}
    # the tune stage: every tuning run and the chosen rates, so a fresh clone does not retune
    tuning = {p.name for p in (out / "tuning" / "runs").glob("*") if p.is_dir()}
    assert tuning == {r.run_id for r in plan.tuning}
    for run in plan.tuning:
        assert (out / "tuning" / "runs" / run.run_id / "metrics.json").exists(), run.run_id
    assert (out / "tuning" / "rates.json").exists() == bool(plan.tuning)


def test_no_weights_or_checkpoints_are_tracked(committed):
    study, _ = committed
    try:
        tracked = subprocess.run(["git", "ls-files", f"results/{study}"], cwd=ROOT, capture_output=True,
                                 text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    assert tracked, f"results/{study} is not committed"
    heavy = [p for p in tracked if "/adapter/" in p or "checkpoint" in p or p.endswith((".safetensors", ".bin", ".pt"))]
    assert heavy == []


_NUMBER = re.compile(r"([+-]?\d+(?:\.\d+)?)")


def same_up_to_last_digit(rebuilt: str, committed: str) -> bool:
    """Equal text, except that a printed number may differ by one unit of its last digit
    (``-0.0`` equals ``+0.0``): a bootstrap percentile can sit on a rounding boundary, and
    float sums over 10,000 replicates differ in the last ulp between CPUs (the committed
    tables were built on another machine than the one that checks them)."""
    if rebuilt == committed:
        return True
    a, b = _NUMBER.split(rebuilt), _NUMBER.split(committed)
    if len(a) != len(b):
        return False
    for i, (x, y) in enumerate(zip(a, b)):
        if i % 2 == 0 or x == y:  # text between numbers must be identical
            if x != y:
                return False
            continue
        decimals = len(x.partition(".")[2])
        if decimals != len(y.partition(".")[2]) or abs(float(x) - float(y)) > 1.0001 * 10.0**-decimals:
            return False
    return True


def test_committed_tables_equal_tables_rebuilt_from_the_stored_runs(committed, tmp_path):
    from harness.analysis.tables import write_tables

    study, plan = committed
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        written = write_tables(plan, tmp_path, verify=False)
    finally:
        os.chdir(cwd)
    compared = 0
    for path in written:
        # provenance lists machines and versions; the budget table comes from the config
        # (its "verified" column from building the model), not from stored results
        if path.suffix != ".md" or path.stem in ("provenance", "budget_table"):
            continue
        committed_text = (ROOT / "results" / study / "tables" / path.name).read_text()
        assert same_up_to_last_digit(path.read_text(), committed_text), (
            f"results/{study}/tables/{path.name} is stale")
        compared += 1
    assert compared >= 4
