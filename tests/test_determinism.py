"""Reproducibility (issue 7, points 10-12): the same config and seed give identical metrics,
a change gives a new folder and never overwrites one, and every run folder holds what is
needed to rerun it."""

from __future__ import annotations

import json

import pytest

from tests.studies import (
    harness,
    metrics_target,
    run_ids,
    snakemake,
    strip_volatile,
    study_config,
)

# -- 10-12. determinism, new folders, provenance ---------------------------------------------


@pytest.fixture(scope="module")
def two_identical_studies(tmp_path_factory):
    folders = []
    for name in ("first", "second"):
        folder = tmp_path_factory.mktemp(name)
        cfg = study_config(folder)
        result = snakemake(
            [metrics_target(cfg, folder), "--cores", "1", "--configfile", str(cfg)], folder
        )
        assert result.returncode == 0, result.stderr[-3000:]
        folders.append((folder, cfg))
    return folders


def test_10_same_config_and_seed_give_identical_metrics(two_identical_studies):
    (first, cfg), (second, _) = two_identical_studies
    run_id = run_ids(cfg, first)[0]
    a = json.loads((first / "out" / "runs" / run_id / "metrics.json").read_text())
    b = json.loads((second / "out" / "runs" / run_id / "metrics.json").read_text())
    assert strip_volatile(a) == strip_volatile(b)
    assert a["timing"] != {} and "provenance" in a


def test_11_changes_give_new_folders_and_nothing_is_overwritten(two_identical_studies, tmp_path):
    (folder, cfg), _ = two_identical_studies
    run_id = run_ids(cfg, folder)[0]
    run_dir = folder / "out" / "runs" / run_id
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}

    # an unchanged config does no work
    again = snakemake(
        [metrics_target(cfg, folder), "-n", "--cores", "1", "--configfile", str(cfg)], folder
    )
    assert again.returncode == 0
    assert "Nothing to be done" in again.stdout + again.stderr

    # effective settings change the folder name; execution-only ones do not
    changed = study_config(tmp_path, train__lr=0.002)
    assert run_ids(changed, tmp_path)[0] != run_id
    execution_only = study_config(tmp_path, train__checkpoint_every=7, train__threads=2)
    assert run_ids(execution_only, tmp_path)[0] == run_id

    # asking for a finished run again is refused, and the files stay byte-identical
    retrain = harness(["train", "--config", str(cfg), "--run", run_id], folder)
    assert retrain.returncode == 2
    assert f"{run_dir.relative_to(folder)}/metrics.json exists: this run is already trained and scored" in retrain.stderr
    assert "never overwritten" in retrain.stderr
    reeval = harness(["evaluate", "--config", str(cfg), "--run", run_id], folder)
    assert reeval.returncode == 2 and "metrics.json exists" in reeval.stderr
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def test_11_a_folder_holding_a_different_run_is_refused(tmp_path):
    from types import SimpleNamespace

    from harness.model.run_folder import RunFolderConflict, write_run_spec

    run = SimpleNamespace(
        run_id="x",
        method="lora",
        tag="r4",
        granularity=1,
        seed=0,
        method_config={},
        effective={"train": {"lr": 0.001}},
    )
    config = {"study": "s", "model": {}, "cache_dir": ".cache", "out_dir": "out"}
    write_run_spec(config, run, tmp_path)
    run.effective = {"train": {"lr": 0.002}}
    with pytest.raises(RunFolderConflict, match=r"train\.lr: stored 0\.001, now 0\.002"):
        write_run_spec(config, run, tmp_path)
    assert json.loads((tmp_path / "run.json").read_text())["effective_config"] == {
        "train": {"lr": 0.001}
    }


def test_12_every_run_folder_holds_what_is_needed_to_rerun_it(two_identical_studies):
    (folder, cfg), _ = two_identical_studies
    run_id = run_ids(cfg, folder)[0]
    run_dir = folder / "out" / "runs" / run_id
    spec = json.loads((run_dir / "run.json").read_text())
    assert spec["seed"] == 0 and spec["method"] == "smora"
    assert spec["effective_config"]["train"]["lr"] == 0.001
    assert spec["model"]["source"] == "tiny-random"
    for name in ("train.json", "metrics.json"):
        provenance = json.loads((run_dir / name).read_text())["provenance"]
        assert {"command", "versions", "git", "hardware", "time_utc"} <= set(provenance)
        assert provenance["versions"]["torch"].startswith("2.13.0")
        assert "commit" in provenance["git"]
        assert run_id in provenance["command"]

