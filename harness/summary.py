"""The per-run summary table: one row per run with the suite's mean score (CSV and Markdown).

Reads only stored results (``metrics.json``, ``train.json``); a run whose
results are missing is named in the error, never silently dropped.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.io import atomic_write_text, read_json


class MissingResultsError(FileNotFoundError):
    pass


def collect_rows(plan) -> pd.DataFrame:
    from harness.aggregate import stage_one_seconds

    rows, missing = [], []
    for run in plan.runs:
        run_dir = plan.run_dir(run)
        metrics_path = run_dir / "metrics.json"
        if not metrics_path.exists():
            missing.append(run.run_id)
            continue
        metrics = read_json(metrics_path)
        row = {
            "run_id": run.run_id,
            "method": run.method,
            "variant": run.tag,
            "granularity": run.granularity,
            "seed": run.seed,
            "suite_acc": metrics["suite_acc"],
            # MoA: share of test prompts routed to their own task's adapter (NaN elsewhere)
            "router_accuracy": metrics.get("router_accuracy"),
            **{f"acc_{task}": v["acc"] for task, v in metrics["tasks"].items()},
        }
        if not run.is_base:
            train_path = run_dir / "train.json"
            if not train_path.exists():
                missing.append(run.run_id)
                continue
            train = read_json(train_path)
            row.update(
                {
                    "total": train["params"]["total"],
                    "activated": train["params"]["activated"],
                    "router": train["params"]["router"],
                    "final_loss": train["final_loss"],
                    # MoA: its task adapters' (stage one) time too
                    "train_s": train["timing"]["wall_s"] + stage_one_seconds(plan, run),
                }
            )
        row["eval_s"] = metrics["timing"]["wall_s"]
        rows.append(row)
    if missing:
        raise MissingResultsError(
            f"{len(missing)} run(s) of study {plan.config['study']!r} have no results in "
            f"{plan.out_dir / 'runs'}: {', '.join(missing)}. Run `snakemake --cores 2 "
            f"--configfile <config>` to produce them."
        )
    frame = pd.DataFrame.from_records(rows)
    if "router_accuracy" in frame and frame["router_accuracy"].isna().all():
        frame = frame.drop(columns="router_accuracy")  # no run routes to task adapters
    return frame


def write_summary(plan, out_dir: Path | None = None) -> pd.DataFrame:
    frame = collect_rows(plan)
    out_dir = Path(out_dir or plan.out_dir)
    atomic_write_text(out_dir / "summary.csv", frame.to_csv(index=False))
    atomic_write_text(out_dir / "summary.md", frame.to_markdown(index=False, floatfmt=".4f") + "\n")
    return frame
