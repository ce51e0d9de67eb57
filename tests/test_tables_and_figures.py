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

from harness.analysis.comparisons import significance_table, trend_table
from harness.analysis.figures import load_profile, pareto_front, write_figures
from harness.analysis.outputs import outputs
from harness.analysis.results import MissingResultsError, collect_results
from harness.analysis.tables import main_table, main_table_texts, write_tables
from harness.common.render import best_cells
from harness.plan.config import validate_config
from harness.plan.study import plan_study

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


ITEMS = 100


def item_bits(acc: float) -> str:
    solved = round(acc * ITEMS)
    return "1" * solved + "0" * (ITEMS - solved)


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
    from harness.data.tasks import test_data_digest

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
        # per-item scores: ITEMS items a task, the easiest ones solved (a better run solves
        # a superset), so every accuracy above is exact
        "items": {task: {"acc": item_bits(acc)} for task, acc in (("alpha", alpha), ("beta", beta))},
        "extra_tasks": {},
        "test_data": test_data_digest(plan.config),
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
    main_md, _, lm_eval_md = texts["md"].partition("lm-eval's `acc` and `acc_norm` per task")
    md_rows = {line.split("|")[1].strip(): line for line in main_md.splitlines() if "|" in line}
    # the second table: lm-eval's own acc per task, no bold
    assert "| alpha acc " in lm_eval_md and "**" not in lm_eval_md
    assert "**71.0**" in md_rows["SiRA G=4"] and "**67.0 ± 2.8**" in md_rows["SiRA G=4"]
    assert "**69.0**" in md_rows["SMoRA G=4"] and "**" not in md_rows["LoRA r=4 (rank R)"]
    assert sum(line.count("**") for line in md_rows.values()) == 6  # three bold cells
    tex = texts["tex"]
    assert r"\textbf{71.0}" in tex and r"\textbf{69.0}" in tex
    assert r"\textbf{67.0 $\pm$ 2.8}" in tex
    assert tex.count(r"\textbf") == 3


def test_significance_is_a_paired_bootstrap_over_seeds_and_items_with_holm_verdicts(plan):
    results = collect_results(plan)
    sig = significance_table(results)
    rows = {(r["comparison"], r["label"]): r for r in sig.to_dict("records")}
    # the family: every variant vs LoRA rank R, finest vs coarsest per method, best vs best other
    vs_r = [label for (c, label) in rows if c == "vs LoRA rank R"]
    assert sorted(vs_r) == sorted(["LoRA r=2 (rank K)", "SiRA G=2", "SiRA G=4", "SMoRA G=2", "SMoRA G=4"])
    assert {label for (c, label) in rows if c == "finest vs coarsest G"} == {"SiRA G=4", "SMoRA G=4"}
    best = {r["label"]: r["versus"] for (c, _), r in rows.items() if c == "best vs best other method"}
    assert best["SiRA G=4"] == "SMoRA G=4" and best["SMoRA G=4"] == "SiRA G=4"
    for (comparison, label), row in rows.items():
        key_a, key_b = _key_of(label), _key_of(row["versus"])
        expected = statistics.mean(suite(key_a, s) - suite(key_b, s) for s in (0, 1)) * 100
        assert row["diff"] == pytest.approx(expected, abs=1e-9), (comparison, label)
        assert row["ci_low"] <= row["diff"] <= row["ci_high"]
        assert 0 < row["p_value"] <= 1 and row["p_holm"] >= row["p_value"]
        assert row["n_seeds"] == 2 and row["n_items"] == 2 * ITEMS
        if row["verdict"] != "no difference detected":
            assert row["ci_family_low"] > 0 or row["ci_family_high"] < 0
            assert row["p_holm"] < 0.05
    # SiRA G=4 beats LoRA rank R by 10 pp and 12 pp on both seeds, items resampled: decided
    assert rows[("vs LoRA rank R", "SiRA G=4")]["verdict"] == "better"


def _key_of(label: str) -> str:
    names = {"LoRA": "lora", "SiRA": "sira", "SMoRA": "smora"}
    name, rest = label.split(" ", 1)
    if rest.startswith("r="):
        return f"{names[name]}-r{rest[2:].split(' ')[0]}"
    return f"{names[name]}-G{rest.removeprefix('G=')}"


def test_identical_runs_give_a_zero_difference_and_p_one(plan):
    """Identical per-item scores (here: SMoRA G=2 made equal to SiRA G=2) cannot be called
    different, and their zero-variance difference gives p = 1, never 0."""
    for run in plan.runs:
        if (run.method, run.tag) == ("smora", "G2"):
            twin = next(r for r in plan.runs if (r.method, r.tag, r.seed) == ("sira", "G2", run.seed))
            source = json.loads((plan.run_dir(twin) / "metrics.json").read_text())
            target = plan.run_dir(run) / "metrics.json"
            data = json.loads(target.read_text())
            data.update(items=source["items"], tasks=source["tasks"], suite_acc=source["suite_acc"])
            target.write_text(json.dumps(data))
    sig = significance_table(collect_results(plan))
    finest = sig[(sig["comparison"] == "finest vs coarsest G") & (sig["label"] == "SMoRA G=4")].iloc[0]
    assert finest["versus"] == "SMoRA G=2"
    row = sig[(sig["comparison"] == "vs LoRA rank R") & (sig["label"] == "SMoRA G=2")].iloc[0]
    twin = sig[(sig["comparison"] == "vs LoRA rank R") & (sig["label"] == "SiRA G=2")].iloc[0]
    assert row["diff"] == twin["diff"] and row["ci_low"] == twin["ci_low"]  # same replicates


def test_granularity_trend_has_a_slope_per_doubling_with_its_interval(plan):
    trend = trend_table(collect_results(plan)).set_index("method")
    assert set(trend.index) == {"sira", "smora"}
    sira = trend.loc["sira"]
    g2 = statistics.mean(suite("sira-G2", s) for s in (0, 1)) * 100
    g4 = statistics.mean(suite("sira-G4", s) for s in (0, 1)) * 100
    assert sira["slope"] == pytest.approx(g4 - g2)  # two points one doubling apart
    assert sira["slope_ci_low"] <= sira["slope"] <= sira["slope_ci_high"]
    assert sira["shape"].split(",")[0] in ("rises", "flat within noise")


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
    for name in ("main_table", "budget_table", "significance", "granularity_trend"):
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
    figures = [p for p in paths if p.suffix in (".png", ".pdf")]
    expected = [Path(p) for o in outputs("figure") for p in o.paths(plan.out_dir)]
    assert sorted(figures) == sorted(expected)
    assert {p.name for p in paths if p.suffix == ".rst"} == {f"{o.name}.rst" for o in outputs("figure")}
    paths = figures
    assert {p.stem for p in paths} == {
        "granularity", "params_vs_acc", "task_heatmap", "expert_load", "training_curves",
        "expert_sharing", "expert_heatmap", "cost",
    } and len(paths) == 16
    for path in paths:
        data = path.read_bytes()
        assert len(data) > 1000, path
        assert data.startswith(b"\x89PNG" if path.suffix == ".png" else b"%PDF"), path


def test_report_cli_commands(plan, tmp_path, capsys):
    from harness.cli.main import main

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
    return ROOT / "Snakefile"


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


def test_power_table_projects_half_widths_and_seeds_from_the_stored_item_scores(plan):
    import pandas as pd

    from harness.analysis.comparisons import power_table
    from harness.analysis.results import row_label
    from harness.analysis.stats import ci_half_width, estimate_components, task_weights

    results = collect_results(plan)
    power = power_table(results, target=3.0)
    sig = significance_table(results)
    # one row per comparison of the family that ran on >= 2 seeds (all here: none is vs the base model)
    assert len(power) == len(sig) and set(power["label"]) == set(sig["label"])
    for row in power.to_dict("records"):
        assert row["n_seeds"] == 2
        assert row["half_width_2x"] < row["half_width"]
        if row["seeds_for_target"] is not None and not pd.isna(row["seeds_for_target"]):
            assert 2 <= row["seeds_for_target"] <= 64
    # the numbers are the stats module's, on the same paired scores
    from harness.analysis.comparisons import _paired, item_scores

    first = power.iloc[0]
    key = next(k for k in results.keys if row_label(plan, *k.split("-", 1)) == first["label"])
    versus = next(k for k in results.keys if row_label(plan, *k.split("-", 1)) == first["versus"])
    a, b, groups = _paired(item_scores(results, key), item_scores(results, versus))
    vs, vi = estimate_components(a * 100, b * 100, weights=task_weights(groups), groups=groups)
    assert first["half_width"] == pytest.approx(ci_half_width(vs, vi, 2, a.shape[1]))


def test_training_gain_is_its_own_family_against_the_base_model(plan):
    results = collect_results(plan)
    gain = significance_table(results, "training")
    methods = significance_table(results)
    trained = sorted(set(methods["label"]) | set(methods["versus"]))
    assert sorted(gain["label"]) == trained and set(gain["versus"]) == {"base model (untrained)"}
    assert set(gain["comparison"]) == {"vs base model"}
    for row in gain.to_dict("records"):
        key = _key_of(row["label"])
        expected = statistics.mean(suite(key, s) - suite("base-G0", 0) for s in (0, 1)) * 100
        assert row["diff"] == pytest.approx(expected, abs=1e-9)
        assert row["ci_low"] <= row["diff"] <= row["ci_high"]
    # Holm within each family: neither family's size widens the other's corrections
    from harness.analysis.tables import significance_texts

    assert f"family of {len(methods)} comparisons" in significance_texts(plan, methods)["md"]
    assert f"family of {len(gain)} comparisons" in significance_texts(plan, gain, "training")["md"]
    with pytest.raises(ValueError, match="family must be 'methods' or 'training'"):
        significance_table(results, "everything")



def test_tables_refuse_to_compare_runs_trained_under_different_engine_code(plan, tmp_path):
    from harness.analysis.tables import write_tables
    from harness.plan.study import code_identity

    today = code_identity()["engine"]["digest"]
    trained = plan.trained_runs
    for i, run in enumerate(trained):
        path = plan.run_dir(run) / "train.json"
        train = json.loads(path.read_text())
        train["code"] = {"engine": {"digest": today if i else "0" * 16}}
        path.write_text(json.dumps(train))
    with pytest.raises(ValueError, match="2 different engine codes") as refused:
        write_tables(plan, tmp_path, verify=False)
    assert trained[0].run_id in str(refused.value) and "declare_number_preserving" in str(refused.value)
    # the same engine everywhere: the tables are written
    path = plan.run_dir(trained[0]) / "train.json"
    train = json.loads(path.read_text())
    train["code"]["engine"]["digest"] = today
    path.write_text(json.dumps(train))
    assert write_tables(plan, tmp_path, verify=False)
