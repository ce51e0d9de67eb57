"""``python -m harness <command>``: the entry points the Snakefile's thin rules call.

Commands: methods, budget, check, status, plan, data, train, evaluate, restore, summary,
identity, compose, tables, figures, bench, export. Every command validates its config first and exits with a
one-paragraph message (status 2) on bad input instead of a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from harness import checkout_warning
from harness.cli.bench import add_commands as add_bench_commands
from harness.cli.console import console, log_to
from harness.cli.export import add_commands as add_export_commands
from harness.cli.outputs import add_commands as add_output_commands
from harness.cli.stages import add_commands as add_stage_commands


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the input (config, data, plugin, folder): one line, no traceback."""
    from harness.adapters import (
        BudgetError,
        ComponentError,
        CountMismatchError,
        OptionError,
        PluginError,
        UnknownMethodError,
    )
    from harness.analysis.results import MissingResultsError
    from harness.common.lock import OutDirLocked
    from harness.common.manifest import VerificationError
    from harness.data.jsonl import DataError
    from harness.data.lm_eval_tasks import TaskFolderError
    from harness.model.load import ModelSourceError
    from harness.model.run_folder import MissingWeightsError, ResultExists, RunFolderConflict
    from harness.plan.checks import PreflightError
    from harness.plan.config import ConfigError
    from harness.run.train import CheckpointError, TrainingDiverged

    return (
        OutDirLocked,
        VerificationError,
        ConfigError,
        BudgetError,
        OptionError,
        PluginError,
        UnknownMethodError,
        CountMismatchError,
        ComponentError,
        ModelSourceError,
        MissingResultsError,
        MissingWeightsError,
        RunFolderConflict,
        ResultExists,
        DataError,
        TrainingDiverged,
        CheckpointError,
        TaskFolderError,
        PreflightError,
    )


# -- methods ---------------------------------------------------------------------------


def _load_config_plugins(folder: Path) -> None:
    """Without ``--config``: the plugins every study config in ``folder`` names, so
    ``python -m harness methods`` lists what the studies here can run. A plugin that does not
    import is named on stderr and skipped (``--config`` makes it an error)."""
    import yaml

    from harness.adapters import PluginError, load_plugin

    for config in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
        try:
            plugins = (yaml.safe_load(config.read_text()) or {}).get("plugins") or []
        except (yaml.YAMLError, AttributeError):
            continue
        for path in plugins:
            try:
                load_plugin(path)
            except PluginError as exc:
                print(f"note: {config}: {exc}", file=sys.stderr)


def cmd_methods(args: argparse.Namespace) -> int:
    from harness.adapters import all_methods, load_plugin
    from harness.adapters.registry import is_builtin, origin
    from harness.plan.config import load_config

    for path in args.plugin or []:
        load_plugin(path)
    if args.config:
        for path in load_config(args.config).get("plugins", []):
            load_plugin(path)
    else:
        _load_config_plugins(Path("config"))
    methods = all_methods()
    mapping = _budget_mapping(load_config(args.config), methods) if args.config else {}
    if args.json:
        print(
            json.dumps(
                {
                    name: {
                        "description": m.description,
                        "paper": m.paper,
                        "routed": m.routed,
                        "hyperparameters": m.hyperparameters(),
                        "defined_in": origin(name),
                        **({"budget": mapping[name]} if name in mapping else {}),
                    }
                    for name, m in methods.items()
                },
                indent=2,
                default=str,
            )
        )
        return 0
    width = max(len(n) for n in methods)
    pad = " " * width
    for name, m in methods.items():
        print(f"{name:<{width}}  {m.description}")
        if m.paper:
            print(f"{pad}  paper: {m.paper}")
        params = ", ".join(f"{k}={v}" for k, v in m.hyperparameters().items())
        print(f"{pad}  hyperparameters: {params}")
        if not is_builtin(name):
            print(f"{pad}  plugin: {origin(name)}")
        if isinstance(mapping.get(name), str):
            print(f"{pad}  budget: does not fit this study: {mapping[name]}")
        for row in mapping.get(name) if isinstance(mapping.get(name), list) else []:
            print(f"{pad}  budget {row['variant']}: {row['mapping']}")
    if args.config:
        budget = load_config(args.config)["budget"]
        print(f"\nbudget mapping: each method solved at {args.config}'s R = {budget['total_rank']}, "
              f"K = {budget['active_rank']}, router {budget.get('router', 'separate')}; 'vs R' and 'vs K' "
              "exclude a separate router (python -m harness budget --config FILE for the study's rows)")
    else:
        print("\nbudget mapping at a study's R, K and G: python -m harness methods --config FILE")
    return 0


def _budget_mapping(config: dict, methods: dict) -> dict[str, list[dict] | str]:
    """Each registered method solved at the study's budget: per variant, the configuration
    the budget gives it and its counts; a method that cannot take this study (its options
    or budget refuse) maps to the reason."""
    from harness.plan.budget import BudgetRequest, solve_study
    from harness.plan.study import load_methods, plan_context, study_shapes

    shapes = study_shapes(config)
    request = BudgetRequest.from_config(config["budget"])
    configured = {method.name: options for method, options in load_methods(config)}
    context = plan_context(config)
    out: dict[str, list[dict] | str] = {}
    for name, method in methods.items():
        try:
            options = configured[name] if name in configured else method.prepare_options({}, context)
            rows = solve_study(request, [(method, options)], shapes)
        except ValueError as exc:
            out[name] = " ".join(str(exc).split())
            continue
        out[name] = []
        for row in rows:
            d = row.as_dict()
            shape = ", ".join(f"{k}={v}" for k, v in row.description.items())
            counts = (f"total {d['total']:,} ({d['total_vs_R']:+.1%} vs R), activated "
                      f"{d['activated']:,} ({d['activated_vs_K']:+.1%} vs K), router {d['router']:,}")
            text = f"{shape}; {counts}" + (f"; {d['note']}" if d["note"] else "")
            out[name].append({"variant": d["variant"], "mapping": text, **{k: d[k] for k in (
                "total", "activated", "router", "total_vs_R", "activated_vs_K", "note")}})
    return out


# -- budget ----------------------------------------------------------------------------


def cmd_budget(args: argparse.Namespace) -> int:
    from harness.plan.budget_table import budget_frame, budget_table_text, verified_budget
    from harness.plan.study import plan_from_file

    config, plan = plan_from_file(args.config)
    verified_budget(plan)
    frame = budget_frame(plan)
    if args.memory:
        from harness.model.load import planning_model
        from harness.plan.memory import markdown, memory_table_for_study

        model_config = None if config["model"].get("config_json") else planning_model(config["model"]).config
        memory = memory_table_for_study(config, plan, model_config=model_config)
        if args.json:
            print(json.dumps(memory.to_dict(orient="records"), indent=2, default=str))
        else:
            print(markdown(memory))
        return 0
    if args.json:
        print(json.dumps(frame.to_dict(orient="records"), indent=2, default=str))
    else:
        print(budget_table_text(plan, frame))
    bad = [row for row in plan.rows if row.verified_total is not None and row.verified_total != row.counts.total]
    if bad:
        details = "; ".join(
            f"{row.method} {row.variant.tag}: the method reports total {row.counts.total:,} but its "
            f"modules hold {row.verified_total:,} trainable parameters"
            for row in bad
        )
        print(f"error: parameter count check failed: {details}", file=sys.stderr)
        return 1
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Every check the Snakefile runs before any job; exit 0 only when the study can run."""
    from harness.plan.checks import run_checks
    from harness.plan.config import load_config

    checks, _ = run_checks(load_config(args.config))
    for c in checks:
        print(f"{'ok ' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        for warning in c.warnings:
            print(f"warn {c.name}: {warning}")
    failed = [c for c in checks if not c.ok]
    print(f"{args.config}: " + ("ready to run" if not failed else f"{len(failed)} check(s) failed"))
    return 0 if not failed else 2


def cmd_status(args: argparse.Namespace) -> int:
    """Every run and component: done / missing / interrupted / failed / corrupt / stale /
    no weights, with the command that fixes it."""
    from harness.plan.status import study_status
    from harness.plan.study import plan_from_file

    _, plan = plan_from_file(args.config)
    states = study_status(plan, args.config)
    width = max((len(s.run_id) for s in states), default=10)
    counts: dict[str, int] = {}
    for st in states:
        counts[st.state] = counts.get(st.state, 0) + 1
        if args.all or st.state != "done":
            print(f"{st.run_id:<{width}}  {st.state:<16}  {st.detail}")
            if st.fix:
                print(f"{'':<{width}}  {'':<16}  fix: {st.fix}")
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from harness.plan.study import plan_from_file

    _, plan = plan_from_file(args.config)
    for run in plan.components if args.components else plan.runs:
        print(run.path if args.components else run.run_id)
    return 0


# -- the rest is added by the workflow modules --------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m harness",
        description="Benchmark and ablation harness for mixture-of-LoRA-experts fine-tuning.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("methods", help="list registered methods with their hyperparameters")
    p.add_argument("--config", help="load the plugins this study config names (default: the plugins "
                   "of every config under config/, a failing one named and skipped)")
    p.add_argument("--plugin", action="append", help="import path of a plugin to load")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_methods)

    p = sub.add_parser("budget", help="parameter budget of every run a config defines (no weights)")
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.add_argument(
        "--memory",
        action="store_true",
        help="estimated peak GPU memory of every run (weights, adapter and optimizer state, "
        "activations; formula in harness/plan/memory.py) and which GPU sizes fit it",
    )
    p.set_defaults(func=cmd_budget)

    p = sub.add_parser(
        "check",
        help="every check the Snakefile runs before any job (config, plugins, budget, data "
        "files, lm-eval task names, model, lengths); exit 0 only when the study can run",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser(
        "status",
        help="where every run stands (done, missing, interrupted, failed, corrupt, stale, no "
        "weights) and the command that fixes it",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--all", action="store_true", help="list finished runs too")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("plan", help="list the run ids a config defines")
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument(
        "--components",
        action="store_true",
        help="list the component folders staged methods are built on (e.g. task adapters) "
        "instead of the runs",
    )
    p.set_defaults(func=cmd_plan)

    add_stage_commands(sub)
    add_output_commands(sub)
    add_bench_commands(sub)
    add_export_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # a torchrun rank (train.processes > 1) writes to the log its launcher already opened
    if getattr(args, "log", None) and "LOCAL_RANK" not in os.environ:
        log_to(args.log)
    warning = checkout_warning("this command")
    if warning:
        print(warning, file=sys.stderr)
    try:
        return int(args.func(args) or 0)
    except _user_errors() as exc:
        if args.debug:
            raise
        if getattr(args, "log", None):
            console(f"error: {exc} (log: {args.log})")
        else:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:  # a run id or name that is not part of the study: one line
        if args.debug:
            raise
        print(f"error: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head`
        return 0
    except Exception as exc:
        if args.debug or not sys.stderr.isatty():
            raise  # a bug, not bad input: the traceback goes to the job's log
        print(
            f"error: {type(exc).__name__}: {exc} (an unexpected error; run again with --debug "
            "for the traceback, and please report it)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
