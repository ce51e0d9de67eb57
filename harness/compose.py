"""MoA's two stages as commands: train one task adapter, or compose trained ones.

``python -m harness train-task-adapter --config C --adapter NAME``
    Stage one: the peft LoRA of one task (``{out_dir}/task_adapters/NAME/``), trained
    only on that task's items. Snakemake's ``train_task_adapter`` rule calls it; the
    names are in ``StudyPlan.task_adapters``.

``python -m harness compose --adapters DIR [DIR ...] --out RUN_DIR``
    Stage two only: a MoA model from any list of trained task-adapter folders plus a
    newly trained router, so an adapter can be dropped or a newly trained one added
    without retraining the others. The folders must share the base model, the adapted
    modules, the rank and alpha (else the error names the folder and the field). The
    router trains on the training items of the adapters' tasks, from the data folder
    the first adapter was trained with (``--data-dir`` to override), with the adapters'
    training settings. ``RUN_DIR`` then is an ordinary run folder: score it with
    ``lm_eval --model moe-lora --model_args run_dir=RUN_DIR``.

Inside a study, the same happens through the DAG: change the ``tasks`` option of
``moa`` and only the stage-two run (its id hashes the list of task adapters) is new.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any


def train_task_adapter(config: dict[str, Any], plan, name: str, progress: bool = True) -> dict[str, Any]:
    """Train the task adapter ``name`` of ``plan`` into its folder; returns its summary."""
    from harness.run_model import write_run_spec
    from harness.train import train_run
    from harness.workflow_cli import _refuse_to_overwrite

    adapter = plan.task_adapter(name)
    folder = plan.out_dir / adapter.path
    _refuse_to_overwrite(folder / "train.json", "trained")
    run = adapter.run()
    write_run_spec(config, run, folder)
    return train_run(config, run, folder, progress=progress, tasks=[adapter.task], steps=adapter.steps)


def _data_tasks(data_dir: Path) -> list[str]:
    import json

    tasks: list[str] = []
    for line in (data_dir / "train.jsonl").read_text().splitlines():
        if line.strip():
            task = json.loads(line).get("task")
            if task not in tasks:
                tasks.append(task)
    return tasks


def compose(
    adapters: list[str | Path],
    out: str | Path,
    router_steps: int | None = None,
    level: str = "sequence",
    seed: int = 0,
    top_k: int = 1,
    router_supervision: float = 1.0,
    router_lr: float | None = 0.01,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build and train (stage two) a MoA run in ``out`` from task-adapter folders."""
    from harness.config import validate_config
    from harness.methods import get_method
    from harness.methods.moa import IncompatibleAdapters, check_compatible, read_task_adapter
    from harness.run_model import write_run_spec
    from harness.study import Run
    from harness.train import train_run
    from harness.workflow_cli import _refuse_to_overwrite

    folders = [Path(a).resolve() for a in adapters]
    infos = [read_task_adapter(f) for f in folders]
    check_compatible(infos)
    first = infos[0]
    T = len(infos)
    if not 1 <= top_k <= T:
        raise IncompatibleAdapters(f"--top-k {top_k} must be between 1 and the {T} adapters")
    data = Path(data_dir) if data_dir is not None else Path(first["data_dir"])
    if not (data / "train.jsonl").exists():
        raise IncompatibleAdapters(
            f"{first['folder']}: field 'data_dir' is {str(data)!r}, which has no train.jsonl; "
            "pass the data folder of the adapters' study with --data-dir"
        )
    if data.name != "data":
        raise IncompatibleAdapters(
            f"--data-dir {str(data)!r}: expected a study's data folder (<out_dir>/data)"
        )
    available = _data_tasks(data)
    for info in infos:
        if info["task"] not in available:
            raise IncompatibleAdapters(
                f"{info['folder']}: field 'task' is {info['task']!r}, which {data / 'train.jsonl'} "
                f"does not have (tasks there: {available}); pass its data folder with --data-dir"
            )
    out = Path(out)
    _refuse_to_overwrite(out / "train.json", "trained")
    steps = router_steps if router_steps is not None else first["steps"]
    train = {k: v for k, v in (first["train"] or {}).items()}
    train["steps"] = steps
    if steps is None and train.get("epochs") is None:
        raise IncompatibleAdapters(
            f"{first['folder']}: neither 'steps' nor train 'epochs' recorded; pass --router-steps"
        )
    config = validate_config(
        {
            "study": "compose",
            "out_dir": str(data.parent),
            "cache_dir": first["cache_dir"] or ".cache",
            "model": first["model_spec"],
            "data": {k: v for k, v in (first["data"] or {"source": "generated"}).items()},
            "budget": {
                "total_rank": T * first["rank"],
                "active_rank": top_k * first["rank"],
                "granularities": [T],
                "alpha": first["alpha"],
            },
            "methods": ["moa"],
            "train": {**train, "seeds": [seed], "checkpoint_every": 0},
        },
        source="compose",
    )
    method = get_method("moa")
    method_config = method.make_config(
        alpha=first["alpha"],
        num_experts=T,
        expert_rank=first["rank"],
        top_k=top_k,
        tasks=[info["task"] for info in infos],
        level=level,
        router_supervision=router_supervision,
        router_lr=router_lr,
        task_steps=first["steps"],
        router_steps=router_steps if router_steps is not None else first["steps"],
    )
    effective = {
        "model": first["model"],
        "data": first["data"],
        "train": train,
        "method": "moa",
        "variant": f"T{T}",
        "method_config": method_config.to_dict(),
        "seed": seed,
        "components": [f.name for f in folders],
    }
    run = Run(
        out.name, "moa", f"T{T}", T, seed, method_config.to_dict(), effective,
        components=[str(f) for f in folders],
    )
    write_run_spec(config, run, out)
    summary = train_run(config, run, out, progress=progress)
    return summary


# -- command line ---------------------------------------------------------------------------


def cmd_train_task_adapter(args: argparse.Namespace) -> int:
    from harness.workflow_cli import _plan

    config, plan = _plan(args.config)
    try:
        adapter = plan.task_adapter(args.adapter)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    summary = train_task_adapter(config, plan, adapter.name, progress=not args.quiet)
    if "stopped_at" in summary:
        print(f"stopped after step {summary['stopped_at']} (checkpoint kept for resuming)")
        return 0
    print(
        f"{adapter.name}: task {adapter.task}, {summary['examples']} examples, "
        f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}"
    )
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    from harness.methods.moa import IncompatibleAdapters

    try:
        summary = compose(
            args.adapters,
            args.out,
            router_steps=args.router_steps,
            level=args.level,
            seed=args.seed,
            top_k=args.top_k,
            router_supervision=args.router_supervision,
            router_lr=args.router_lr,
            data_dir=args.data_dir,
            progress=not args.quiet,
        )
    except IncompatibleAdapters as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: MoA of {len(args.adapters)} task adapters, router trained for "
        f"{summary['steps']} steps, final loss {summary['final_loss']:.4f}; score it with "
        f"lm_eval --model moe-lora --model_args run_dir={os.fspath(args.out)}"
    )
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "train-task-adapter",
        help="MoA stage one: train one task's LoRA on that task's items only",
    )
    p.add_argument("--config", required=True)
    p.add_argument("--adapter", required=True, help="folder name under <out_dir>/task_adapters")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train_task_adapter)

    p = sub.add_parser(
        "compose",
        help="MoA stage two: a router over trained task-adapter folders (add or drop adapters)",
    )
    p.add_argument("--adapters", nargs="+", required=True, metavar="DIR",
                   help="task-adapter folders (<out_dir>/task_adapters/...), in router order")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="the new run folder")
    p.add_argument("--router-steps", type=int, default=None,
                   help="router training steps (default: the adapters' own step count)")
    p.add_argument("--level", choices=("sequence", "token"), default="sequence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top-k", type=int, default=1, help="task adapters used per sequence/token")
    p.add_argument("--router-supervision", type=float, default=1.0,
                   help="weight of the task-label cross-entropy on the router")
    p.add_argument("--router-lr", type=float, default=0.01,
                   help="the router's peak learning rate (default 0.01, as in a study)")
    p.add_argument("--data-dir", default=None,
                   help="data folder with train.jsonl (default: the first adapter's)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_compose)
