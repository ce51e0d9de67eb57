"""The per-method table: every (method, variant) of the study's plan (first seed) beside the
reference (peft's LoRA) at ranks R and K, and the cached-vs-full-depth comparison."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.adapters import BudgetRequest, get_method, reference_method
from harness.bench.contenders import make_contender, release, state_bytes
from harness.bench.timing import ratio_range, summarise, time_round_robin
from harness.plan.study import plan_study

if TYPE_CHECKING:
    from harness.bench.context import BenchContext


@dataclass
class Spec:
    """One contender of the main table; ``reference``: ``"R"``/``"K"`` for the references."""

    key: str
    method: str
    variant: str
    granularity: int
    config: Any
    reference: str | None = None
    components: list[Path] = field(default_factory=list)


def plan_contenders(ctx: BenchContext) -> list[Spec]:
    """Per (method, variant) of the plan (first seed), plus the reference method at ranks R
    and K when the config does not list it."""
    plan = plan_study(ctx.config)
    refs = {(row.method, row.variant.tag): row.variant.reference for row in plan.rows}
    out: list[Spec] = []
    seen = set()
    for run in plan.runs:
        if run.is_base or run.seed != ctx.seed:
            continue
        key = f"{run.method}-{run.tag}"
        if key in seen:
            continue
        seen.add(key)
        config = get_method(run.method).make_config(**run.method_config)
        out.append(
            Spec(key, run.method, run.tag, run.granularity, config, refs.get((run.method, run.tag)),
                 [plan.out_dir / c for c in run.components])
        )
    request = BudgetRequest.from_config(ctx.config["budget"])
    reference = reference_method()
    for variant in reference.variants(request):
        key = f"{reference.name}-{variant.tag}"
        if key not in seen:
            seen.add(key)
            config = reference.solve(request, variant, plan.shapes)
            out.append(Spec(key, reference.name, variant.tag, 1, config, variant.reference))
    return out


def bench_main(ctx: BenchContext, log: Callable[[str], None]) -> tuple[list[dict], dict]:
    """The per-method table and the cached-vs-full-depth comparison for the reference at rank R."""
    o = ctx.options
    specs = plan_contenders(ctx)
    contenders = [
        make_contender(ctx, s.key, s.method, s.config, s.variant, s.granularity, component_dirs=s.components)
        for s in specs
    ]
    ref_spec = next(s for s in specs if s.reference == "R")
    ref = contenders[specs.index(ref_spec)]
    full = None
    if ctx.start is not None:
        full = make_contender(
            ctx, f"{ref.key}-full-depth", ref.method, ref.method_config, ref.variant, 1, True
        )
        contenders.append(full)
    log(f"main table: {len(contenders)} contenders, {o.warmup_steps} warm-up + "
        f"{o.repeats} x {o.timed_steps} timed steps each, round robin")
    time_round_robin(ctx, contenders, o.warmup_steps, o.timed_steps, o.repeats, o.eval_batches, log)

    ref_s = summarise(ref)
    rows = []
    for c in contenders:
        if c is full:
            continue
        s = summarise(c)
        lo, hi = ratio_range(c, ref)
        rows.append(
            {
                "method": c.method,
                "variant": c.variant,
                "G": c.granularity,
                "experts": c.info.get("num_experts"),
                "expert_rank": c.info.get("expert_rank"),
                "top_k": c.info.get("top_k"),
                "path": c.info.get("path", "peft"),
                "trainable_params": c.info["trainable_params"],
                "step_ms_median": s["step_ms_median"],
                "step_ms_iqr": s["step_ms_iqr"],
                "ratio_vs_lora_R": s["step_ms_median"] / ref_s["step_ms_median"],
                "ratio_min": lo,
                "ratio_max": hi,
                "tokens_per_s": ctx.real_tokens / (s["step_ms_median"] / 1000),
                "eval_ms_median": s["eval_ms_median"],
                "eval_seq_per_s": ctx.eval_sequences / (s["eval_ms_median"] / 1000),
                "eval_ratio_vs_lora_R": s["eval_ms_median"] / ref_s["eval_ms_median"],
                "state_mb": state_bytes(c) / 2**20,
                "saved_act_mb": (c.saved_act_bytes or 0) / 2**20,
                "cuda_peak_mb": None if c.cuda_peak_bytes is None else c.cuda_peak_bytes / 2**20,
            }
        )
    cache = {}
    if full is not None:
        fs = summarise(full)
        n = min(len(full.losses), len(ref.losses))
        diffs = [abs(a - b) for a, b in zip(full.losses[:n], ref.losses[:n])]
        cache = {
            "method": ref.method,
            "variant": ref.variant,
            "split_layer": ctx.start,
            "layers_total": len(ctx.model.model.layers),
            "full_depth_step_ms": fs["step_ms_median"],
            "full_depth_step_ms_iqr": fs["step_ms_iqr"],
            "cached_step_ms": ref_s["step_ms_median"],
            "cached_step_ms_iqr": ref_s["step_ms_iqr"],
            "speedup": fs["step_ms_median"] / ref_s["step_ms_median"],
            "full_depth_eval_ms": fs["eval_ms_median"],
            "cached_eval_ms": ref_s["eval_ms_median"],
            "eval_speedup": fs["eval_ms_median"] / ref_s["eval_ms_median"],
            "steps_compared": n,
            "max_abs_loss_diff": max(diffs) if diffs else float("nan"),
            "first_loss": ref.losses[0] if ref.losses else float("nan"),
            "last_loss": ref.losses[n - 1] if n else float("nan"),
        }
    release(*contenders)
    return rows, cache


__all__ = ["Spec", "bench_main", "plan_contenders"]
