"""Workflow commands (data, train, evaluate, summary, compose): what the Snakefile's rules call."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.run_model import refuse_to_overwrite
from harness.study import plan_from_file


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

    config, plan = plan_from_file(args.config)
    run = plan.run(run_id_of(args.run))
    if run.is_base:
        print(f"{run.run_id} is the untrained base model: nothing to train", file=sys.stderr)
        return 2
    run_dir = plan.run_dir(run)
    refuse_to_overwrite(run_dir / "train.json", "trained")
    write_run_spec(config, run, run_dir)
    summary = train_run(config, run, run_dir, progress=not args.quiet, stop_after=args.stop_after)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} (checkpoint kept for resuming)")
        return 0
    print(
        f"{run.run_id}: {summary['examples']} examples, {summary['steps']} steps, final loss "
        f"{summary['final_loss']:.4f}, {summary['timing']['wall_s']:.1f} s"
    )
    if args.evaluate and not run.is_component and not (run_dir / "metrics.json").exists():
        from harness.evaluate import evaluate_run

        metrics = evaluate_run(config, run, run_dir, progress=not args.quiet, pending=True)
        print(f"{run.run_id}: scored at once, suite acc {metrics['suite_acc']:.4f} (metrics.pending.json)")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from harness.evaluate import evaluate_run

    config, plan = plan_from_file(args.config)
    run = plan.run(run_id_of(args.run))
    if run.is_component:
        print(f"{run.run_id} is a component (trained for the runs built on it), not scored on its own",
              file=sys.stderr)
        return 2
    refuse_to_overwrite(plan.run_dir(run) / "metrics.json", "evaluated")
    metrics = evaluate_run(config, run, plan.run_dir(run), progress=not args.quiet)
    print(f"{run.run_id}: suite acc {metrics['suite_acc']:.4f}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore the weights of a finished run (and of the components it is built on)."""
    from harness.run_model import write_run_spec
    from harness.train import restore_weights

    config, plan = plan_from_file(args.config)
    run = plan.run(run_id_of(args.run))
    if run.is_base:
        print(f"{run.run_id} is the untrained base model: it has no weights", file=sys.stderr)
        return 2
    for path in run.components:
        part = plan.run(path.rpartition("/")[2])
        if not (plan.run_dir(part) / "adapter" / "adapter.safetensors").exists():
            write_run_spec(config, part, plan.run_dir(part))
            record = restore_weights(config, part, plan.run_dir(part), progress=not args.quiet)
            print(_restored_words(part.run_id, record))
    record = restore_weights(config, run, plan.run_dir(run), progress=not args.quiet)
    print(_restored_words(run.run_id, record))
    return 0


def _restored_words(run_id: str, record: dict) -> str:
    if not record["restored"]:
        return f"{run_id}: {record['reason']}"
    same = (
        "identical losses at every step"
        if record["identical_losses"]
        else f"losses differ from the stored run by up to {record['max_abs_loss_diff']:.3g} (another "
        "machine's kernels or library versions; see restore.json)"
    )
    return f"{run_id}: weights restored ({record['steps_compared']} steps retrained, {same})"


def run_id_of(value: str) -> str:
    """A run id, also when a run folder (``.../runs/<id>`` or ``.../<group>/<id>``) is given."""
    return Path(value.rstrip("/")).name if ("/" in value or Path(value).is_dir()) else value


def cmd_summary(args: argparse.Namespace) -> int:
    from harness.summary import write_summary

    _, plan = plan_from_file(args.config)
    frame = write_summary(plan)
    print(frame.to_string(index=False))
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    from harness.identity import compare_with_base, write_identity

    _, plan = plan_from_file(args.config)
    report = compare_with_base(plan, args.batch_size)
    paths = write_identity(plan, report)
    print(paths[1].read_text(), end="")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from harness.compose import compose, parse_options

    summary = compose(
        args.method,
        args.components,
        args.out,
        options=parse_options(args.option),
        seed=args.seed,
        data_dir=args.data_dir,
        progress=not args.quiet,
    )
    print(
        f"{args.out}: {args.method} over {len(args.components)} components, trained for "
        f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}; score it with "
        f"lm_eval --model moe-lora --model_args run_dir={os.fspath(args.out)}"
    )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser("data", help="write the training JSONL and the lm-eval task folder")
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser(
        "train",
        help="train one run or component (resumes from its last checkpoint)",
        description="Train one run of a study, or one component a staged run is built on "
        "(e.g. a task adapter). A killed job resumes from its last checkpoint.",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument(
        "--run",
        required=True,
        metavar="ID_OR_FOLDER",
        help="run id or component name (or its folder), as `python -m harness plan --config FILE` "
        "lists them",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="also score the run with lm-eval right away, in this process, into "
        "metrics.pending.json (the evaluate rule then only moves it into place: one process "
        "start per run instead of two)",
    )
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score one run (or the base model) with lm-eval")
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--run", required=True, metavar="ID_OR_FOLDER",
                   help="run id (or its folder), as `python -m harness plan --config FILE` lists them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "restore",
        help="rebuild the weights of a finished run (they are never committed): retrain it "
        "deterministically and check the losses against its stored log",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--run", required=True, metavar="ID_OR_FOLDER",
                   help="run id (or its folder), as `python -m harness plan --config FILE` lists them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_restore)

    p = sub.add_parser("summary", help="one row per run with the suite's mean score (CSV, Markdown)")
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.set_defaults(func=cmd_summary)

    p = sub.add_parser(
        "identity",
        help="score the base model with lm-eval's own `hf` model on the study's task YAMLs and "
        "compare with the harness's base run (acc and acc_norm per task)",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--batch-size", type=int, default=None, help="lm-eval batch size (default: eval.batch_size)")
    p.set_defaults(func=cmd_identity)

    p = sub.add_parser(
        "compose",
        help="a staged method's last stage over existing component folders (e.g. MoA's router "
        "over task adapters)",
    )
    p.add_argument("--method", required=True,
                   help="a staged method (one whose runs are built on components; see `python -m harness methods`)")
    p.add_argument("--components", nargs="+", required=True, metavar="DIR",
                   help="component folders (e.g. <out_dir>/task_adapters/...), in the method's order")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the new run folder")
    p.add_argument("--option", action="append", metavar="KEY=VALUE",
                   help="a method option (YAML value), repeatable, e.g. --option top_k=1")
    p.add_argument("--seed", type=int, default=0, help="seed of the last stage (default 0)")
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help="data folder with train.jsonl (default: the first component's)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_compose)
