"""``python -m harness bench --config FILE``: step time, throughput and memory of every method,
as ratios to peft LoRA at rank R measured in the same process (:mod:`harness.bench`)."""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_bench(args: argparse.Namespace) -> int:
    from harness.bench import run_bench
    from harness.plan.config import load_config

    config = load_config(args.config)
    if args.device:
        config["model"]["device"] = args.device
    if args.dtype:
        config["model"]["dtype"] = args.dtype
    overrides = {
        "threads": args.threads,
        "warmup_steps": args.warmup_steps,
        "timed_steps": args.timed_steps,
        "repeats": args.repeats,
        "sweep_steps": args.sweep_steps,
        "sweep_repeats": args.sweep_repeats,
    }
    if args.no_crossover:
        overrides["crossover"] = False
    if args.no_scaling:
        overrides["scaling"] = False
    if args.no_eval_cache:
        overrides["eval_cache"] = False
    run_bench(config, Path(args.out) if args.out else None, **overrides)
    return 0


def cmd_bench_ranks(args: argparse.Namespace) -> int:
    from harness.bench.ranks import bench_ranks
    from harness.plan.config import load_config

    config = load_config(args.config)
    out = Path(args.out) if args.out else Path(config["out_dir"]) / "bench" / "ranks"
    bench_ranks(config, out, args.processes, method=args.method, steps=args.steps)
    return 0


def add_commands(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="training step time, tokens/s, evaluation throughput and memory of every method "
        "(and peft LoRA at ranks R and K), as ratios to LoRA rank R, under <out_dir>/bench",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--out", default=None, metavar="DIR", help="write here instead of <out_dir>/bench")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: bench.threads, 2)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="override model.device")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="override model.dtype (bfloat16 on CUDA: bf16 autocast, as training)")
    p.add_argument("--warmup-steps", type=int, default=None, help="untimed steps per contender (bench.warmup_steps)")
    p.add_argument("--timed-steps", type=int, default=None, help="timed steps per repeat (bench.timed_steps)")
    p.add_argument("--repeats", type=int, default=None, help="round-robin repeats (bench.repeats)")
    p.add_argument("--sweep-steps", type=int, default=None, help="timed steps per repeat in the sweeps")
    p.add_argument("--sweep-repeats", type=int, default=None, help="repeats in the sweeps")
    p.add_argument("--no-crossover", action="store_true", help="skip the dense-vs-sparse sweep")
    p.add_argument("--no-scaling", action="store_true", help="skip the scaling sweeps and figure")
    p.add_argument("--no-eval-cache", action="store_true",
                   help="skip the real lm-eval evaluation with and without the shared lower-layer cache")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "bench-ranks",
        help="step time of one run on N data-parallel ranks (torchrun) against one rank at the "
        "same global batch, under <out_dir>/bench/ranks",
    )
    p.add_argument("--config", required=True, metavar="FILE", help="study config (YAML)")
    p.add_argument("--processes", type=int, default=2, help="ranks to compare against one (default 2)")
    p.add_argument("--method", default=None, help="the method to train (default: the config's first)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: train.steps)")
    p.add_argument("--out", default=None, metavar="DIR", help="write here instead of <out_dir>/bench/ranks")
    p.set_defaults(func=cmd_bench_ranks)
