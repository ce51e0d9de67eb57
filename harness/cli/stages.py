"""Stage commands (data, train, evaluate, restore, set-aside, summary, identity, compose): what
the Snakefile's rules call. Each imports its stage inside the command, so ``python -m
harness methods`` or ``--help`` starts without importing torch, transformers or lm-eval
(about 7 s on the development machine)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from harness.cli.console import console
from harness.common.lock import out_dir_lock
from harness.model.run_folder import ResultExists, refuse_to_overwrite
from harness.plan.study import plan_from_file


def cmd_data(args: argparse.Namespace) -> int:
    from harness.data.prepare import prepare_data
    from harness.model.shapes import store_shapes
    from harness.plan.config import load_config

    config = load_config(args.config)
    with out_dir_lock(config["out_dir"], _what("data", args)):
        summary = prepare_data(
            config["data"], Path(config["out_dir"]) / "data", general_text=config["eval"].get("general_text"),
            tune=config.get("tune"),
        )
        store_shapes(config)  # every later plan reads them instead of building the model
    counts = ", ".join(f"{t}: {n}" for t, n in summary.get("train_counts", {}).items())
    print(f"data ready in {Path(config['out_dir']) / 'data'}" + (f" ({counts})" if counts else ""))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    """Train one run and, unless ``--no-score``, score it right away in this process, or
    train one component. A run whose training finished but whose scores are missing is
    scored again without retraining (its weights restored first when they are not here).
    The Snakefile's ``train`` rule passes ``--no-score`` and scores in its own job
    (``evaluate``): a failed scoring then never discards the finished training."""
    config, plan = plan_from_file(args.config)
    run = plan.run(run_id_of(args.run))
    if run.is_base:
        print(f"{run.run_id} is the untrained base model: nothing to train", file=sys.stderr)
        return 2
    with out_dir_lock(config["out_dir"], _what("train", args)):
        return _train(args, config, plan, run)


def _train(args: argparse.Namespace, config, plan, run) -> int:
    """:func:`cmd_train`'s work, with the out_dir lock held (or held by the snakemake whose
    job this is)."""
    from harness.model.run_folder import write_run_spec
    from harness.run.evaluate import evaluate_run
    from harness.run.restore import restore_weights
    from harness.run.train import relaunch_under_torchrun, train_run

    run_dir = plan.run_dir(run)
    score = not run.is_component and not args.no_score
    if score:
        refuse_to_overwrite(run_dir / "metrics.json", "trained and scored")
    trained = (run_dir / "train.json").exists()
    if trained and not score:
        refuse_to_overwrite(run_dir / "train.json", "trained")
    write_run_spec(config, run, run_dir)
    if trained:
        if not (run_dir / "adapter" / "adapter.safetensors").exists():
            record = restore_weights(config, run, run_dir, progress=not args.quiet)
            print(_restored_words(run.run_id, record))
        print(f"{run.run_id}: already trained ({run_dir / 'train.json'}); scoring it")
    else:
        # train.processes > 1: this command again as that many torchrun ranks (no return)
        relaunch_under_torchrun(config, _train_args(args))
        summary = train_run(config, run, run_dir, progress=not args.quiet, stop_after=args.stop_after)
        if summary.get("rank", 0) != 0:
            return 0  # another rank of a several-rank run: rank 0 reports and scores
        if "stopped_at" in summary:
            print(f"stopped after step {summary['stopped_at']} (checkpoint kept for resuming)")
            return 0
        if summary.get("resumed_from_step") is not None:
            console(f"resumed {run.run_id} from step {summary['resumed_from_step']} of {summary['steps']}")
        print(
            f"{run.run_id}: {summary['examples']} examples, {summary['steps']} steps, final loss "
            f"{summary['final_loss']:.4f}, {summary['timing']['wall_s']:.1f} s"
        )
    if score:
        metrics = evaluate_run(config, run, run_dir, progress=not args.quiet)
        print(f"{run.run_id}: suite score {metrics['suite_acc']:.4f}")
    return 0


def _train_args(args: argparse.Namespace) -> list[str]:
    """The ``train`` command line of ``args`` (what each torchrun rank runs)."""
    out = ["--debug"] * bool(getattr(args, "debug", False))
    out += ["train", "--config", str(args.config), "--run", str(args.run)]
    out += ["--quiet"] * bool(args.quiet) + ["--no-score"] * bool(args.no_score)
    if args.log:
        out += ["--log", str(args.log)]
    if args.stop_after is not None:
        out += ["--stop-after", str(args.stop_after)]
    return out


def cmd_tune(args: argparse.Namespace) -> int:
    """Choose each tuned method x variant's learning rate from its validation scores."""
    from harness.run.tune import choose_rates

    _, plan = plan_from_file(args.config)
    if not plan.tuning:
        print(f"{args.config} has no tune stage (no `tune:` section)", file=sys.stderr)
        return 2
    with out_dir_lock(plan.out_dir, _what("tune", args)):
        record = choose_rates(plan)
    for key, entry in record["rates"].items():
        scores = ", ".join(f"{lr}: {sum(v) / len(v):.4f}" for lr, v in entry["validation"].items())
        print(f"{key}: lr {entry['lr']:g}  (validation score by rate: {scores})")
    print(f"wrote {plan.rates_path}")
    return 0


def cmd_set_aside(args: argparse.Namespace) -> int:
    """Move an invalid result file to the name the plan gave it (never delete it)."""
    source, target = Path(args.file), Path(args.to)
    if target.exists():
        raise ResultExists(f"{target} exists: {source} was set aside before; nothing moved")
    if not source.exists():
        raise FileNotFoundError(f"{source} is not there to be set aside")
    os.replace(source, target)
    print(f"moved {source} aside to {target.name}: its job redoes it")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from harness.run.evaluate import evaluate_run

    config, plan = plan_from_file(args.config)
    run = plan.run(run_id_of(args.run))
    if run.is_component:
        print(f"{run.run_id} is a component (trained for the runs built on it), not scored on its own",
              file=sys.stderr)
        return 2
    with out_dir_lock(plan.out_dir, _what("evaluate", args)):
        refuse_to_overwrite(plan.run_dir(run) / "metrics.json", "evaluated")
        metrics = evaluate_run(config, run, plan.run_dir(run), progress=not args.quiet)
    print(f"{run.run_id}: suite acc {metrics['suite_acc']:.4f}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    """Restore the weights of a finished run (and of the components it is built on)."""
    from harness.model.run_folder import write_run_spec
    from harness.run.restore import restore_weights

    config, plan = plan_from_file(args.config)
    run = plan.run(run_id_of(args.run))
    if run.is_base:
        print(f"{run.run_id} is the untrained base model: it has no weights", file=sys.stderr)
        return 2
    with out_dir_lock(plan.out_dir, _what("restore", args)):
        for path in run.components:
            part = plan.run(path.rpartition("/")[2])
            if not (plan.run_dir(part) / "adapter" / "adapter.safetensors").exists():
                write_run_spec(config, part, plan.run_dir(part))
                record = restore_weights(config, part, plan.run_dir(part), progress=not args.quiet)
                print(_restored_words(part.run_id, record))
        record = restore_weights(config, run, plan.run_dir(run), progress=not args.quiet)
    print(_restored_words(run.run_id, record))
    return 0


def _what(command: str, args: argparse.Namespace) -> str:
    """The command line a lock holder records (what a refused process names)."""
    run = f" --run {args.run}" if getattr(args, "run", None) else ""
    return f"python -m harness {command} --config {args.config}{run}"


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
    from harness.analysis.summary import write_summary
    from harness.common.manifest import record_files
    from harness.plan.status import assert_results_valid

    _, plan = plan_from_file(args.config)
    with out_dir_lock(plan.out_dir, _what("summary", args)):
        assert_results_valid(plan)  # never summarises an invalid result (status names each)
        frame = write_summary(plan)
        record_files(plan.out_dir, ["summary.csv", "summary.md"])
    print(frame.to_string(index=False))
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    from harness.run.identity import compare, write_identity

    _, plan = plan_from_file(args.config)
    report = compare(plan, args.batch_size, run_id=run_id_of(args.run) if args.run else None,
                     trained=not args.base_only)
    paths = write_identity(plan, report)
    print(paths[1].read_text(), end="")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from harness.run.compose import compose, parse_options

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
        help="train one run and score it, or train one component (resumes from its last checkpoint)",
        description="Train one run of a study and score it with lm-eval in the same process "
        "(--no-score: train only), or train one component a staged run is built on (e.g. a task "
        "adapter). A killed job resumes from its last checkpoint; a run trained but not scored is "
        "only scored. Refused while another process (e.g. a snakemake) works in the out_dir.",
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
        "--no-score",
        action="store_true",
        help="train only (a run is otherwise scored with lm-eval right away, in this process); "
        "the Snakefile's train rule trains only and scores in its own job, so a failed scoring "
        "never discards the training",
    )
    p.add_argument("--log", metavar="FILE", help="write all output to FILE (a job's log)")
    p.add_argument("--stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score one run (or the base model) with lm-eval")
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--run", required=True, metavar="ID_OR_FOLDER",
                   help="run id (or its folder), as `python -m harness plan --config FILE` lists them")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--log", metavar="FILE", help="write all output to FILE (a job's log)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "tune",
        help="the tune stage's choice: each tuned method x variant's learning rate, from its runs' "
        "validation scores (writes <out_dir>/tuning/rates.json)",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.set_defaults(func=cmd_tune)

    p = sub.add_parser(
        "set-aside",
        help="move an invalid result file aside (the Snakefile's set_aside rule; never deletes)",
    )
    p.add_argument("--file", required=True, help="the corrupt or stale result file")
    p.add_argument("--to", required=True, help="the name it is moved to")
    p.set_defaults(func=cmd_set_aside)

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
        help="score the base model and a LoRA run with lm-eval's own `hf` model (the LoRA run's "
        "adapter loaded by peft: peft=<folder>) on the study's task YAMLs and compare with the "
        "harness's scores, task by task",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--run", metavar="ID_OR_FOLDER", default=None,
                   help="the LoRA run to check (default: the study's first run of peft's LoRA)")
    p.add_argument("--base-only", action="store_true", help="check the untrained base model only")
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
