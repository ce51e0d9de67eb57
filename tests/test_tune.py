"""The tune stage (issue 26.4): the validation split, the rule that chooses a rate, what a
tuned run's id depends on, and how a finished tuned run relates to the choice. The stage
end to end (tuning jobs, the choice, the final runs at the chosen rate) runs in the smoke
study (tests/test_e2e.py)."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from harness.data.suite import generate_suite
from harness.data.validation import validation_split
from harness.plan.config import load_config
from harness.plan.status import invalid_files
from harness.plan.study import plan_study, row_key
from harness.run.tune import choose
from tests.studies import study_config

TUNE = {"lrs": [0.001, 0.003, 0.01], "validation_fraction": 0.25}


def test_choose_takes_the_best_mean_over_tuning_seeds_and_a_tie_goes_to_the_smaller_rate():
    # 3e-3 has the best single seed but 1e-2 the best mean
    assert choose({0.001: [0.5, 0.5], 0.003: [0.9, 0.3], 0.01: [0.7, 0.65]}) == 0.01
    assert choose({0.01: [0.8], 0.003: [0.8], 0.001: [0.6]}) == 0.003
    with pytest.raises(ValueError, match=r"tune\.rule = 'best_last'; valid: best_mean"):
        choose({0.001: [0.5]}, "best_last")


def test_validation_split_holds_out_a_label_balanced_share_of_every_task_and_nothing_else():
    items = generate_suite(1, ["animal", "color", "tool"], 24, 4)["train"]
    train, valid = validation_split(items, 0.25, seed=0)
    assert len(train) + len(valid) == len(items)
    assert not {id(it) for it in train} & {id(it) for it in valid}
    per_label = Counter((it["task"], it["label"]) for it in items)
    held = Counter((it["task"], it["label"]) for it in valid)
    assert held == {key: round(0.25 * n) for key, n in per_label.items()}
    # the same seed holds out the same items; another seed others
    assert validation_split(items, 0.25, seed=0)[1] == valid
    assert validation_split(items, 0.25, seed=1)[1] != valid
    with pytest.raises(ValueError, match=r"validation_fraction = 0.01 leaves task 'animal' \(24 training items\) "
                                         "with no validation item"):
        validation_split(items, 0.01, seed=0)


def _plan(tmp_path, monkeypatch, **tune):
    path = study_config(tmp_path, methods=["lora", "sira"], tune={**TUNE, **tune},
                        data={"source": "generated", "train_per_task": 16, "test_per_task": 4})
    monkeypatch.chdir(tmp_path)
    return plan_study(load_config(path))


def test_tuning_runs_cover_every_rate_and_tuning_seed_apart_from_the_reported_seeds(tmp_path, monkeypatch):
    plan = _plan(tmp_path, monkeypatch, seeds=[1000, 1001])
    tuned_rows = {row_key(r.method, r.tag) for r in plan.runs if r.tuned}
    assert tuned_rows == {"lora-r4", "lora-r2", "sira-G2"}
    grid = Counter((row_key(r.method, r.tag), r.settings.lr, r.seed) for r in plan.tuning)
    assert grid == {(row, lr, seed): 1 for row in tuned_rows for lr in TUNE["lrs"] for seed in (1000, 1001)}
    assert all(r.split == "tune" and r.seed not in (0,) for r in plan.tuning)
    # a final tuned run's rate is unknown until the tune stage has chosen it
    assert all(r.settings.lr is None for r in plan.runs if r.tuned)


def test_a_tuned_runs_id_hashes_the_tune_stage_so_another_grid_is_another_run(tmp_path, monkeypatch):
    ids = {r.run_id for r in _plan(tmp_path, monkeypatch).runs}
    other = {r.run_id for r in _plan(tmp_path, monkeypatch, lrs=[0.001, 0.003, 0.03]).runs}
    split = {r.run_id for r in _plan(tmp_path, monkeypatch, validation_fraction=0.5).runs}
    assert len(ids) == 3 and ids.isdisjoint(other) and ids.isdisjoint(split)


def _finish(plan, run, lr: float) -> None:
    """A finished run's records as training and scoring write them (no weights needed)."""
    from harness.data.tasks import test_data_digest

    folder = plan.run_dir(run)
    folder.mkdir(parents=True, exist_ok=True)
    common = {"run_id": run.run_id, "method": run.method, "variant": run.tag,
              "granularity": run.granularity, "seed": run.seed}
    (folder / "train.json").write_text(json.dumps({
        **common, "settings": {"lr": lr}, "steps": 8, "examples": 48, "final_loss": 1.0,
        "first_loss": 2.0, "params": {}, "method_config": {}, "effective_config": {}}))
    (folder / "metrics.json").write_text(json.dumps({
        **common, "suite_acc": 0.5, "tasks": {}, "items": {}, "test_data": test_data_digest(plan.config)}))


def test_a_finished_tuned_run_is_stale_when_the_choice_moved_and_otherwise_does_not_wait_for_it(
    tmp_path, monkeypatch
):
    from harness.cli.snakefile import tuned_rate_inputs_of

    plan = _plan(tmp_path, monkeypatch)
    run = next(r for r in plan.runs if r.tuned and r.method == "sira")
    untuned_inputs = tuned_rate_inputs_of("out", plan)
    wildcards = type("Wildcards", (), {"run": run.run_id})
    # not trained yet: its job waits for the tune stage's choice
    assert untuned_inputs(wildcards) == ["out/tuning/rates.json"]
    plan.rates_path.parent.mkdir(parents=True)
    plan.rates_path.write_text(json.dumps({"rates": {"sira-G2": {"lr": 0.003}}}))
    _finish(plan, run, 0.003)
    # finished at the chosen rate: valid, and a rewritten choice (a new method) retrains nothing
    assert invalid_files(plan, run) == [] and untuned_inputs(wildcards) == []
    # the choice moved (its tuning runs redone elsewhere): the run is stale, and says why
    plan.rates_path.write_text(json.dumps({"rates": {"sira-G2": {"lr": 0.01}}}))
    ((path, why, detail), orphan) = invalid_files(plan, run)
    assert (path.name, why) == ("train.json", "stale")
    assert detail == "trained at lr 0.003, but the tune stage now chooses 0.01 (tuning/rates.json)"
    assert orphan[1] == "orphan"
    assert untuned_inputs(wildcards) == ["out/tuning/rates.json"]
