"""One real lm-eval evaluation with and without the shared lower-layer cache (what the cache
saves over a study's evaluations)."""

from __future__ import annotations

import copy
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from harness.adapters import get_method
from harness.bench.contenders import install, make_contender, note, release
from harness.data.prepare import prepare_data
from harness.model.load import cache_root
from harness.model.run_folder import write_run_spec
from harness.plan.study import plan_study
from harness.run.evaluate import evaluate_run

if TYPE_CHECKING:
    from harness.bench.context import BenchContext


def bench_eval_cache(ctx: BenchContext, log: Callable[[str], None], work: Path) -> dict | None:
    """One real evaluation (:func:`harness.run.evaluate.evaluate_run`, lm-eval on the study's
    task folder) of an (untrained) LoRA rank R adapter, three ways: with the shared
    evaluation cache when it does not exist yet (the first run of a study builds it),
    when it exists (every later run), and without it (``model.lower_layer_cache: false``:
    full depth every run), after one untimed warm-up evaluation. Threads: the study's
    ``train.threads``, as its jobs use."""
    config = ctx.config
    if ctx.start is None:
        note(ctx, "eval cache comparison skipped: no lower-layer split (model.lower_layer_cache is "
                   "false or the lowest layer is adapted)")
        return None
    if config["data"]["source"] == "lm_eval":
        note(ctx, "eval cache comparison skipped: data.source lm_eval scores registry tasks")
        return None
    plan = plan_study(config)
    ref = {(row.method, row.variant.tag) for row in plan.rows if row.variant.reference == "R"}
    run = next((r for r in plan.trained_runs if (r.method, r.tag) in ref), None)
    if run is None:
        note(ctx, "eval cache comparison skipped: the config has no reference run at rank R "
                  "(add the reference method, peft's LoRA, to methods)")
        return None
    shutil.rmtree(work, ignore_errors=True)
    cache = work / "cache"
    (cache / "models").mkdir(parents=True)
    out_dir = config["out_dir"]
    if not (Path(out_dir) / "data" / "data_summary.json").exists():
        # no study data folder yet: write the same data (deterministic) into the work folder
        out_dir = str(work)
        prepare_data(config["data"], work / "data")
        note(ctx, "eval cache: the study's data folder does not exist yet; its data were written "
                   "to a temporary folder for the comparison")
    real_models = (cache_root(config) / "models").resolve()
    for p in real_models.iterdir():
        if p.is_dir():
            (cache / "models" / p.name).symlink_to(p)
    # an adapter to load: the reference at rank R as initialised (the cost does not depend
    # on the weights)
    config_r = get_method(run.method).make_config(**run.method_config)
    c = make_contender(ctx, "eval-cache", run.method, config_r)
    install(ctx, c.layers)
    run_dir = work / "run"
    # an untimed first evaluation takes the one-time costs of the process (lm-eval's task
    # building, first reads of the weights) off whichever variant would come first
    variants = {
        "warmup": (True, "untimed: one-time costs of the process; its cache is deleted"),
        "cache_build": (True, "first run of a study: builds the shared cache, then scores"),
        "cache_reuse": (True, "every later run: the shared cache exists"),
        "no_cache": (False, "model.lower_layer_cache: false: full depth every run"),
    }
    threads_before = torch.get_num_threads()
    env_cache = os.environ.pop("HARNESS_CACHE", None)  # it would override the private cache_dir
    out: dict[str, Any] = {"threads": config["train"]["threads"], "runs_in_study": len(plan.runs)}
    try:
        for name, (enabled, _) in variants.items():
            if name == "cache_build":
                shutil.rmtree(cache / "lower", ignore_errors=True)
            cfg = copy.deepcopy(config)
            cfg["cache_dir"] = str(cache)
            cfg["out_dir"] = out_dir
            cfg["model"]["lower_layer_cache"] = enabled
            shutil.rmtree(run_dir, ignore_errors=True)
            write_run_spec(cfg, run, run_dir)
            c.handle.save(run_dir / "adapter", extra={"run_id": run.run_id})
            log(f"eval cache: {name} ...")
            t0 = time.perf_counter()
            metrics = evaluate_run(cfg, run, run_dir, progress=False)
            if name != "warmup":
                out[f"{name}_s"] = time.perf_counter() - t0
                out[f"{name}_acc"] = metrics["suite_acc"]
    finally:
        if env_cache is not None:
            os.environ["HARNESS_CACHE"] = env_cache
        torch.set_num_threads(threads_before)
        install(ctx, ctx.original_layers)
        release(c)
        shutil.rmtree(work, ignore_errors=True)
    n = out["runs_in_study"]
    out["study_eval_before_s"] = n * out["no_cache_s"]
    out["study_eval_after_s"] = out["cache_build_s"] + (n - 1) * out["cache_reuse_s"]
    out["study_eval_saved_s"] = out["study_eval_before_s"] - out["study_eval_after_s"]
    out["same_scores"] = out["cache_reuse_acc"] == out["no_cache_acc"] == out["cache_build_acc"]
    return out
