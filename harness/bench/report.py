"""The benchmark's report: CSV files and ``bench.md`` with every ratio measured in the run."""

from __future__ import annotations

import csv
import math
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.adapters.core import SPARSE_CROSSOVER_RATIO
from harness.bench.crossover import crossover_point
from harness.bench.timing import peak_rss_mb

if TYPE_CHECKING:
    from harness.bench.context import BenchContext


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def write_csv(rows: list[dict], path: Path) -> None:
    if not rows:
        return
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main_markdown(rows: list[dict], R: int) -> str:
    headers = [
        "method", "variant", "experts x rank (top-k)", "path", "step ms (median ± IQR)",
        f"× LoRA r{R} (range)", "tokens/s", "eval seq/s", f"eval × LoRA r{R}",
        "state MB", "saved act. MB",
    ]
    if any(r["cuda_peak_mb"] is not None for r in rows):
        headers.append("CUDA peak MB")
    body = []
    for r in rows:
        shape = f"{r['experts']} x {r['expert_rank']} ({r['top_k']})"
        line = [
            r["method"], r["variant"], shape, r["path"],
            f"{r['step_ms_median']:.1f} ± {r['step_ms_iqr']:.1f}",
            f"{r['ratio_vs_lora_R']:.2f} ({r['ratio_min']:.2f}–{r['ratio_max']:.2f})",
            f"{r['tokens_per_s']:.0f}", f"{r['eval_seq_per_s']:.0f}", f"{r['eval_ratio_vs_lora_R']:.2f}",
            f"{r['state_mb']:.1f}", f"{r['saved_act_mb']:.1f}",
        ]
        if len(headers) > len(line):
            line.append(_fmt(r["cuda_peak_mb"], 0))
        body.append(line)
    return markdown_table(headers, body)


def device_words(ctx: BenchContext) -> str:
    if ctx.device.type == "cuda":
        return f"{torch.cuda.get_device_name(ctx.device)}, dtype {ctx.config['model']['dtype']}"
    return f"CPU ({platform.processor() or platform.machine()}), {torch.get_num_threads()} torch threads, " \
           f"dtype {ctx.config['model']['dtype']}"


def write_report(
    ctx: BenchContext,
    out: Path,
    main_rows: list[dict],
    cache: dict,
    crossover_rows: list[dict],
    scaling_rows: list[dict],
    eval_cache: dict | None,
    wall_s: float,
) -> str:
    R = ctx.config["budget"]["total_rank"]
    o = ctx.options
    parts = [
        f"# Benchmark: {ctx.config['study']}",
        "",
        f"Device: {device_words(ctx)}. Model: {ctx.config['model']['source']}, "
        f"layers {ctx.layer_ids[0]}–{ctx.layer_ids[-1]} adapted "
        f"({len(ctx.targets)} linear layers), budget R = {R}, K = {ctx.config['budget']['active_rank']}.",
        "",
        f"{o.warmup_steps} warm-up steps, then {o.repeats} round-robin repeats of {o.timed_steps} timed "
        f"training steps and {o.eval_batches} evaluation batches per contender. "
        "Ratios are to peft LoRA rank R measured in the same process; "
        "the range is the ratio's min–max over the repeats.",
        "",
        *[f"- {n}" for n in ctx.notes],
        "",
        "## Training step and evaluation, per method",
        "",
        main_markdown(main_rows, R),
        "",
    ]
    if cache:
        parts += [
            "## Frozen lower-layer cache (LoRA rank R)",
            "",
            markdown_table(
                ["", "full depth", f"from cache (layers {cache['split_layer']}+ of {cache['layers_total']})",
                 "speed-up"],
                [
                    ["training step, ms", f"{cache['full_depth_step_ms']:.1f}", f"{cache['cached_step_ms']:.1f}",
                     f"{cache['speedup']:.2f}x"],
                    ["evaluation batch, ms", f"{cache['full_depth_eval_ms']:.1f}", f"{cache['cached_eval_ms']:.1f}",
                     f"{cache['eval_speedup']:.2f}x"],
                ],
            ),
            "",
            f"Same initial weights and batches: the largest |loss difference| over "
            f"{cache['steps_compared']} steps is {cache['max_abs_loss_diff']:.3g}.",
            "",
        ]
    if crossover_rows:
        point = crossover_point(crossover_rows)
        body = []
        for r in crossover_rows:
            if r["path"] != "dense":
                continue
            sp = next(x for x in crossover_rows if x["experts"] == r["experts"] and x["path"] == "sparse")
            body.append([
                str(r["experts"]), str(r["top_k"]), f"{r['experts_per_top_k']:g}",
                f"{r['step_ms_median']:.1f}", f"{sp['step_ms_median']:.1f}", f"{r['sparse_over_dense']:.2f}",
                r["auto_picks"],
            ])
        parts += [
            f"## Dense vs sparse execution ({crossover_rows[0]['method']}, rank-1 experts)",
            "",
            markdown_table(
                ["experts", "top-k", "experts / top-k", "dense ms", "sparse ms", "sparse / dense",
                 "auto picks"], body),
            "",
            (f"Sparse is faster from experts / top-k = {point:g} on."
             if point is not None else
             "Sparse is slower at every measured experts / top-k.")
            + f" `path: auto` picks sparse from experts / top-k = {SPARSE_CROSSOVER_RATIO:g} "
            "(`harness.adapters.core.SPARSE_CROSSOVER_RATIO`, set from this benchmark on the "
            "default CPU setup); a method's `path` option (`dense`, `sparse`) overrides it.",
            "",
        ]
    if scaling_rows:
        parts += ["## Scaling", "", "See `scaling.png` / `scaling.csv`.", ""]
    if eval_cache:
        e = eval_cache
        parts += [
            "## Evaluation lower-layer cache, one real lm-eval evaluation "
            f"({e['threads']} thread(s), as the study's jobs)",
            "",
            markdown_table(
                ["", "seconds", "suite acc"],
                [
                    ["with cache, first run (builds it)", f"{e['cache_build_s']:.1f}", _fmt(e["cache_build_acc"], 4)],
                    ["with cache, later runs", f"{e['cache_reuse_s']:.1f}", _fmt(e["cache_reuse_acc"], 4)],
                    ["without cache (full depth)", f"{e['no_cache_s']:.1f}", _fmt(e["no_cache_acc"], 4)],
                ],
            ),
            "",
            "Each after one untimed warm-up evaluation in the same process; the cache is private "
            "to the benchmark (built from scratch for the first row). "
            f"Study with {e['runs_in_study']} evaluations (computed: runs x seconds): "
            f"{e['study_eval_before_s'] / 60:.1f} min without the cache, "
            f"{e['study_eval_after_s'] / 60:.1f} min with it "
            f"(saves {e['study_eval_saved_s'] / 60:.1f} min).",
            "",
        ]
    parts += [
        f"Process peak resident memory (ru_maxrss): {peak_rss_mb():.0f} MiB. Benchmark wall time: "
        f"{wall_s:.0f} s.",
        "",
    ]
    text = "\n".join(parts)
    (out / "bench.md").write_text(text)
    return text
