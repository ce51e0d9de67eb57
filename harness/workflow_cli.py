"""Workflow commands (data, train, evaluate, summary): what the Snakefile's rules call."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _plan(config_path: str):
    from harness.config import load_config
    from harness.study import plan_study

    config = load_config(config_path)
    return config, plan_study(config)


def _refuse_to_overwrite(result: Path, what: str) -> None:
    from harness.run_model import RunFolderConflict

    if result.exists():
        raise RunFolderConflict(
            f"{result} exists: this run is already {what} and its results are never "
            "overwritten. Delete that file (or the run folder) by hand to redo it."
        )


def cmd_data(args: argparse.Namespace) -> int:
    from harness.config import load_config
    from harness.data.prepare import prepare_data

    config = load_config(args.config)
    summary = prepare_data(config["data"], Path(config["out_dir"]) / "data")
    counts = ", ".join(f"{t}: {n}" for t, n in summary.get("train_counts", {}).items())
    print(f"data ready in {Path(config['out_dir']) / 'data'}" + (f" ({counts})" if counts else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from harness.run_model import write_run_spec
    from harness.train import train_run

    config, plan = _plan(args.config)
    run = plan.run(args.run)
    if run.is_base:
        print(f"{run.run_id} is the untrained base model: nothing to train", file=sys.stderr)
        return 2
    run_dir = plan.run_dir(run)
    _refuse_to_overwrite(run_dir / "train.json", "trained")
    write_run_spec(config, run, run_dir)
    summary = train_run(config, run, run_dir, progress=not args.quiet, stop_after=args.stop_after)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} (checkpoint kept for resuming)")
        return 0
    print(
        f"{run.run_id}: {summary['steps']} steps, final loss {summary['final_loss']:.4f}, "
        f"{summary['timing']['wall_s']:.1f} s"
    )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from harness.evaluate import evaluate_run

    config, plan = _plan(args.config)
    run = plan.run(args.run)
    _refuse_to_overwrite(plan.run_dir(run) / "metrics.json", "evaluated")
    metrics = evaluate_run(config, run, plan.run_dir(run), progress=not args.quiet)
    print(f"{run.run_id}: suite acc {metrics['suite_acc']:.4f}")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from harness.summary import write_summary

    _, plan = _plan(args.config)
    frame = write_summary(plan)
    print(frame.to_string(index=False))
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="write the training JSONL and the lm-eval task folder")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train one run (resumes from its last checkpoint)")
    p.add_argument("--config", required=True)
    p.add_argument("--run", required=True, help="run id, as listed by `python -m harness plan`")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score one run (or the base model) with lm-eval")
    p.add_argument("--config", required=True)
    p.add_argument("--run", required=True)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("summary", help="one row per run with the suite's mean score (CSV, Markdown)")
    p.add_argument("--config", required=True)
    p.set_defaults(func=cmd_summary)
