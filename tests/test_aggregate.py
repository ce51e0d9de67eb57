"""Tables and figures from stored results: fixture run folders written here by hand.

The fixture study: methods lora + sira + smora, R = 4, K = 2, G in {2, 4}, seeds 0 and 1,
plus the untrained base model; two tasks. Every number the tables print is checked
against a hand computation with the standard library (``statistics``), not pandas.
"""

from __future__ import annotations

import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from harness.aggregate import (
    main_table,
    main_table_texts,
    paired_difference,
    significance_table,
    write_tables,
)
from harness.config import validate_config
from harness.figures import figure_paths, load_profile, pareto_front, write_figures
from harness.render import best_cells
from harness.results import MissingResultsError, collect_results
from harness.study import plan_study

ROOT = Path(__file__).resolve().parent.parent
TASKS = ["alpha", "beta"]
STEPS = 12
LAYERS = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]

#: (method-variant, seed) -> (alpha, beta) accuracy; the suite is their mean
ACC = {
    ("base-G0", 0): (0.25, 0.25),
    ("lora-r4", 0): (0.60, 0.50),
    ("lora-r4", 1): (0.64, 0.52),
    ("lora-r2", 0): (0.55, 0.45),
    ("lora-r2", 1): (0.57, 0.47),
    ("sira-G2", 0): (0.62, 0.56),
    ("sira-G2", 1): (0.66, 0.50),
    ("sira-G4", 0): (0.70, 0.60),  # best alpha and best suite
    ("sira-G4", 1): (0.72, 0.66),
    ("smora-G2", 0): (0.58, 0.54),
    ("smora-G2", 1): (0.60, 0.50),
    ("smora-G4", 0): (0.61, 0.70),  # best beta
    ("smora-G4", 1): (0.67, 0.68),
}

#: the last logged expert load of sira G4 (both seeds): one skewed layer, one balanced
SIRA_G4_LOAD = {LAYERS[0]: [0.1, 0.4, 0.2, 0.3], LAYERS[1]: [0.25, 0.25, 0.25, 0.25]}


def fixture_config(out_dir: Path | str) -> dict:
    return {
        "study": "fixture",
        "out_dir": str(out_dir),
        "model": {
            "source": "tiny-random",
            "tiny": {
                "hidden_size": 32,
                "intermediate_size": 48,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 300,
            },
            "adapt_layers": {"top": 1},
            "target_modules": ["q_proj", "v_proj"],
        },
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2, 4], "alpha": 8},
        "methods": ["lora", "sira", "smora"],
        "data": {"source": "generated", "train_per_task": 4, "test_per_task": 4},
        "train": {"seeds": [0, 1], "steps": STEPS},
    }


def suite(key: str, seed: int) -> float:
    a, b = ACC[(key, seed)]
    return (a + b) / 2


def load_for(run, step: int):
    if run.row is None or not run.row.routed:
        return None
    if (run.method, run.tag) == ("sira", "G4"):
        return SIRA_G4_LOAD
    g = run.granularity
    return {layer: [1 / g] * g for layer in LAYERS}


def write_run(plan, run, mtime: float | None = None) -> None:
    run_dir = plan.run_dir(run)
    run_dir.mkdir(parents=True, exist_ok=True)
    key = f"{run.method}-{run.tag}"
    alpha, beta = ACC[(key, run.seed)]
    ident = {
        "run_id": run.run_id,
        "method": run.method,
        "variant": run.tag,
        "granularity": run.granularity,
        "seed": run.seed,
    }
    prov = {
        "versions": {"python": "3.11", "torch": "2.x", "lm_eval": "0.4"},
        "git": {"commit": "0123456789abcdef", "dirty": False},
        "hardware": {"cpu": "fixture cpu", "cuda": False},
        "command": "fixture",
        "time_utc": "2025-01-01T00:00:00+00:00",
    }
    files = []
    if not run.is_base:
        counts = run.row.counts
        (run_dir / "train_log.jsonl").write_text(
            "".join(
                json.dumps(
                    {
                        "step": step,
                        "loss": 2.0 - 0.1 * step + 0.01 * run.seed,
                        "aux_loss": None,
                        "lr": 0.001,
                        "grad_norm": 1.0,
                        "step_time": 0.1,
                        **(
                            {"expert_load": load_for(run, step)}
                            if step % 10 == 0 or step == STEPS - 1
                            else {}
                        ),
                    }
                )
                + "\n"
                for step in range(STEPS)
            )
        )
        train = {
            **ident,
            "steps": STEPS,
            "batch_size": 8,
            "examples": 8,
            "final_loss": 1.0,
            "first_loss": 2.0,
            "params": {
                "total": counts.total,
                "activated": counts.activated,
                "router": counts.router,
                "trainable_numel": counts.total,
            },
            "method_config": run.method_config,
            "timing": {"wall_s": 10.0 + run.seed, "train_loop_s": 9.0, "median_step_s": 0.1},
            "device": "cpu",
            "effective_config": run.effective,
            "provenance": prov,
        }
        (run_dir / "train.json").write_text(json.dumps(train))
        files += ["train_log.jsonl", "train.json"]
    metrics = {
        **ident,
        "suite_acc": (alpha + beta) / 2,
        "tasks": {
            "alpha": {"acc": alpha, "acc_stderr": 0.05},
            "beta": {"acc": beta, "acc_stderr": 0.05},
        },
        "extra_tasks": {},
        "lm_eval_version": "0.4.fixture",
        "timing": {"model_load_s": 1.0, "lm_eval_s": 2.0, "wall_s": 3.0},
        "provenance": prov,
    }
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    files.append("metrics.json")
    if mtime is not None:  # train outputs before metrics, as a real run leaves them
        for i, name in enumerate(files):
            os.utime(run_dir / name, (mtime + i, mtime + i))


@pytest.fixture(scope="module")
def shapes():
    """The fixture model's adapted layers, written out (``study_shapes`` would build the model
    on the meta device, which costs a transformers import); checked against it in the
    Snakemake test, whose run ids come from the real planner."""
    from harness.adapters import TargetShape

    # hidden 32, 4 heads of 8, 2 key-value heads: q_proj 32 -> 32, v_proj 32 -> 16
    return [
        TargetShape("model.layers.1.self_attn.q_proj", 32, 32),
        TargetShape("model.layers.1.self_attn.v_proj", 32, 16),
    ]


@pytest.fixture
def plan(tmp_path, shapes):
    config = validate_config(fixture_config(tmp_path / "results"), source="fixture")
    plan = plan_study(config, shapes=shapes)
    for run in plan.runs:
        write_run(plan, run)
    return plan


def test_fixture_study_has_the_expected_runs(plan):
    keys = sorted({f"{r.method}-{r.tag}" for r in plan.runs})
    assert keys == sorted({k for k, _ in ACC})
    assert len(plan.runs) == len(ACC)


def test_main_table_equals_hand_computation(plan):
    results = collect_results(plan)
    table = main_table(results).set_index("label")
    # the references and the base model are always present, first
    assert list(table.index[:3]) == [
        "base model (untrained)",
        "LoRA r=4 (rank R)",
        "LoRA r=2 (rank K)",
    ]
    assert len(table) == 7
    for label, key in [
        ("LoRA r=4 (rank R)", "lora-r4"),
        ("SiRA G=4", "sira-G4"),
        ("SMoRA G=2", "smora-G2"),
    ]:
        row = table.loc[label]
        per_seed = [suite(key, s) * 100 for s in (0, 1)]
        assert row["n_seeds"] == 2
        assert row["alpha"] == pytest.approx(
            statistics.mean(ACC[(key, s)][0] * 100 for s in (0, 1))
        )
        assert row["beta"] == pytest.approx(statistics.mean(ACC[(key, s)][1] * 100 for s in (0, 1)))
        assert row["suite_mean"] == pytest.approx(statistics.mean(per_seed))
        assert row["suite_std"] == pytest.approx(statistics.stdev(per_seed))  # ddof = 1
        assert row["train_s"] == pytest.approx(10.5)
        assert row["router_mode"] == "separate"
    base = table.loc["base model (untrained)"]
    assert base["n_seeds"] == 1 and base["suite_mean"] == pytest.approx(25.0)
    assert math.isnan(base["suite_std"]) and math.isnan(base["total"])  # no adapter at all
    # parameters come from train.json, which the fixture filled from the budget rows
    rows = {f"{r.method}-{r.variant.tag}": r for r in plan.rows}
    assert table.loc["SiRA G=4", "total"] == rows["sira-G4"].counts.total
    assert table.loc["SiRA G=4", "router"] == rows["sira-G4"].counts.router > 0
    assert table.loc["LoRA r=2 (rank K)", "activated"] == rows["lora-r2"].counts.activated


def test_best_value_is_marked_on_the_right_cell(plan):
    results = collect_results(plan)
    table = main_table(results)
    best = best_cells(table, ["alpha", "beta", "suite_mean"])
    label = table["label"]
    assert {label[i] for i in best["alpha"]} == {"SiRA G=4"}
    assert {label[i] for i in best["beta"]} == {"SMoRA G=4"}
    assert {label[i] for i in best["suite_mean"]} == {"SiRA G=4"}
    texts = main_table_texts(results, table)
    md_rows = {line.split("|")[1].strip(): line for line in texts["md"].splitlines() if "|" in line}
    assert "**71.0**" in md_rows["SiRA G=4"] and "**67.0 ± 2.8**" in md_rows["SiRA G=4"]
    assert "**69.0**" in md_rows["SMoRA G=4"] and "**" not in md_rows["LoRA r=4 (rank R)"]
    assert sum(line.count("**") for line in md_rows.values()) == 6  # three bold cells
    tex = texts["tex"]
    assert r"\textbf{71.0}" in tex and r"\textbf{69.0}" in tex
    assert r"\textbf{67.0 $\pm$ 2.8}" in tex
    assert tex.count(r"\textbf") == 3


def test_paired_differences_equal_hand_computation(plan):
    results = collect_results(plan)
    sig = significance_table(results)
    vs_r = sig[sig["comparison"] == "vs LoRA rank R"].set_index("label")
    assert "LoRA r=4 (rank R)" not in vs_r.index and "base model (untrained)" not in vs_r.index
    assert "LoRA r=2 (rank K)" in vs_r.index
    from scipy.stats import t as student_t

    for label, key in [("SiRA G=4", "sira-G4"), ("SMoRA G=2", "smora-G2")]:
        d = [(suite(key, s) - suite("lora-r4", s)) * 100 for s in (0, 1)]
        mean, std = statistics.mean(d), statistics.stdev(d)
        se = std / math.sqrt(2)
        p = 2 * student_t.sf(abs(mean / se), df=1)
        row = vs_r.loc[label]
        assert row["n_pairs"] == 2
        assert row["mean_diff"] == pytest.approx(mean)
        assert row["std_diff"] == pytest.approx(std)
        assert row["se"] == pytest.approx(se)
        assert row["p_value"] == pytest.approx(p)
    # SiRA G4: +10, +11 pp -> mean 10.5, se 0.5, p ~ 0.03: a real gain
    assert vs_r.loc["SiRA G=4", "verdict"] == "better"
    # SMoRA G2: +1, -3 pp -> mean -1, se 2: within noise
    assert vs_r.loc["SMoRA G=2", "verdict"] == "within noise"
    fine = sig[sig["comparison"] == "finest vs coarsest G"].set_index("label")
    assert set(fine.index) == {"SiRA G=4", "SMoRA G=4"}
    assert fine.loc["SiRA G=4", "versus"] == "SiRA G=2"
    d = [(suite("sira-G4", s) - suite("sira-G2", s)) * 100 for s in (0, 1)]
    assert fine.loc["SiRA G=4", "mean_diff"] == pytest.approx(statistics.mean(d))


def test_paired_difference_edge_cases():
    import pandas as pd

    one = paired_difference(pd.Series({0: 60.0}), pd.Series({0: 55.0}))
    assert one["n_pairs"] == 1 and math.isnan(one["p_value"]) and math.isnan(one["std_diff"])
    assert one["mean_diff"] == pytest.approx(5.0) and "no noise estimate" in one["verdict"]
    same = paired_difference(pd.Series({0: 60.0, 1: 62.0}), pd.Series({0: 55.0, 1: 57.0}))
    assert same["std_diff"] == pytest.approx(0.0) and same["p_value"] == 0.0
    # only the seeds both sides ran are paired
    partial = paired_difference(pd.Series({0: 1.0, 1: 2.0, 2: 9.0}), pd.Series({0: 0.0, 1: 2.0}))
    assert partial["n_pairs"] == 2 and partial["mean_diff"] == pytest.approx(0.5)


def test_missing_runs_are_named_not_dropped(plan):
    sira = next(r for r in plan.runs if r.method == "sira")
    smora = next(r for r in plan.runs if r.method == "smora")
    base = next(r for r in plan.runs if r.is_base)
    (plan.run_dir(sira) / "metrics.json").unlink()
    (plan.run_dir(smora) / "train.json").unlink()
    (plan.run_dir(base) / "metrics.json").unlink()
    with pytest.raises(MissingResultsError) as err:
        collect_results(plan)
    message = str(err.value)
    assert f"{sira.run_id}: metrics.json" in message
    assert f"{smora.run_id}: train.json" in message
    assert f"{base.run_id}: metrics.json" in message
    assert "3 of 13 run(s)" in message
    # the figures also need the training logs
    (plan.run_dir(smora) / "train_log.jsonl").unlink()
    with pytest.raises(
        MissingResultsError, match=re.escape(f"{smora.run_id}: train.json, train_log.jsonl")
    ):
        write_figures(plan)


def test_write_tables_writes_csv_md_tex(plan):
    paths = write_tables(plan)
    tables = plan.out_dir / "tables"
    for name in ("main_table", "budget_table", "significance"):
        for ext in ("csv", "md", "tex"):
            assert tables / f"{name}.{ext}" in paths
            assert (tables / f"{name}.{ext}").stat().st_size > 0
    assert (tables / "provenance.csv").read_text().count("0123456789ab") == len(plan.runs)
    budget_tex = (tables / "budget_table.tex").read_text()
    assert "_" not in budget_tex.replace(r"\_", "")  # every underscore escaped
    assert "budget_table" not in budget_tex  # no stray file names
    budget = (tables / "budget_table.csv").read_text()
    assert "True" in budget and "False" not in budget  # counts verified on meta layers
    assert not list(tables.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_expert_load_profile_and_pareto_front(plan):
    results = collect_results(plan, logs=True)
    profile = load_profile(results.loads, "sira-G4")
    # each layer sorted, then averaged over layers (and the two identical seeds)
    expected = [(0.4 + 0.25) / 2, (0.3 + 0.25) / 2, (0.2 + 0.25) / 2, (0.1 + 0.25) / 2]
    assert profile["mean"] == pytest.approx(expected)
    assert profile["pairs"] == 4 and profile["step"] == STEPS - 1
    h_skewed = -sum(p * math.log(p) for p in SIRA_G4_LOAD[LAYERS[0]]) / math.log(4)
    assert profile["entropy"] == pytest.approx((h_skewed + 1.0) / 2)
    assert results.loads[results.loads["method"] == "lora"].empty  # no routing: no load
    curves = results.curves
    assert len(curves) == STEPS * len(plan.trained_runs)
    import numpy as np

    x = np.array([10.0, 20.0, 20.0, 30.0, 40.0])
    y = np.array([50.0, 55.0, 60.0, 58.0, 61.0])
    assert list(pareto_front(x, y)) == [0, 2, 4]


def test_every_figure_is_written_as_png_and_pdf(plan):
    paths = write_figures(plan)
    assert sorted(paths) == sorted(figure_paths(plan.out_dir))
    assert len(paths) == 10
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000, path
        assert data.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF"), path


def test_report_cli_commands(plan, tmp_path, capsys):
    from harness.cli import main

    config_path = tmp_path / "fixture.yaml"
    config_path.write_text(yaml.safe_dump(plan.config))
    assert main(["tables", "--config", str(config_path), "--no-verify"]) == 0
    out = capsys.readouterr().out
    assert "main_table.tex" in out and "significance.md" in out
    (plan.run_dir(plan.runs[0]) / "metrics.json").unlink()
    assert main(["figures", "--config", str(config_path)]) == 2
    err = capsys.readouterr().err
    assert plan.runs[0].run_id in err and "metrics.json" in err and "Traceback" not in err


# -- the workflow: figures from stored results schedule no training ---------------------------


def _snakefile_for(tmp_path: Path) -> Path:
    """The real Snakefile once it includes the report rules; until then a wrapper that
    includes both."""
    real = ROOT / "Snakefile"
    if "report.smk" in real.read_text():
        return real
    wrapper = tmp_path / "Snakefile.wrapper"
    wrapper.write_text(
        f'include: "{real}"\ninclude: "{ROOT / "workflow" / "rules" / "report.smk"}"\n'
    )
    return wrapper


def _job_stats(output: str) -> dict[str, int]:
    """Rule -> job count from a dry run's ``Job stats`` table."""
    jobs: dict[str, int] = {}
    lines = output.splitlines()
    for i, line in enumerate(lines):
        if line.strip() == "Job stats:":
            for row in lines[i + 3 :]:
                parts = row.split()
                if len(parts) != 2 or not parts[1].isdigit():
                    break
                jobs[parts[0]] = int(parts[1])
    return jobs


@pytest.mark.slow
@pytest.mark.parametrize("order", ["run", "clone"])
def test_snakemake_figures_schedules_no_training_when_results_exist(tmp_path, shapes, order):
    """``snakemake -n figures tables`` with every run's results on disk schedules those two
    jobs and nothing else. ``run``: files dated in the order a run writes them (data, then
    training outputs, then metrics). ``clone``: dated in path order, as ``git clone`` writes
    them (``metrics.json`` before ``train.json``)."""
    work = tmp_path / "work"
    work.mkdir()
    config = fixture_config("results")  # relative to the Snakemake working directory
    config_path = work / "study.yaml"
    config_path.write_text(yaml.safe_dump(config))
    abs_config = validate_config(fixture_config(work / "results"), source="fixture")
    plan = plan_study(abs_config, shapes=shapes)
    t0 = time.time() - 3600
    data = work / "results" / "data"
    data.mkdir(parents=True)
    for name in ("train.jsonl", "data_summary.json"):
        (data / name).write_text("{}\n")
        os.utime(data / name, (t0, t0))
    for run in plan.runs:
        write_run(plan, run, mtime=t0 + 60)
    if order == "clone":
        files = sorted(p for p in (work / "results").rglob("*") if p.is_file())
        for i, path in enumerate(files):
            os.utime(path, (t0 + i * 0.001, t0 + i * 0.001))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "snakemake",
            "-n",
            "figures",
            "tables",
            "--snakefile",
            str(_snakefile_for(tmp_path)),
            "--directory",
            str(work),
            "--configfile",
            str(config_path),
            "--cores",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output
    jobs = _job_stats(output)
    assert jobs == {"figures": 1, "tables": 1, "total": 2}, output
