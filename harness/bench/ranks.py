"""``python -m harness bench-ranks``: the step time of one run trained on ``N`` data-parallel
ranks against the same run on one, at the same global batch (issue 32; docs/cluster.md,
"Several GPUs per run").

Both trainings go through the study's own path, ``python -m harness train`` (torchrun
started by the harness when ``train.processes > 1``), each into its own folder under
``--out``, from the same config with only ``train.processes`` changed. The median step time
each run records in its ``train.json`` (``timing.median_step_s``, rank 0's steps) is the
measurement; the table gives both and their ratio ``N ranks / 1 rank``. On one CPU machine
with a tiny model the ranks share the cores and pay gloo's all-reduce, so a ratio near or
above 1 is expected there: it shows the launch and the reduction work, not the scaling; the
GPU node (one GPU per rank) is where the speed-up is measured.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.common.files import atomic_write_json, atomic_write_text
from harness.plan.study import plan_study


def _train(config: dict[str, Any], folder: Path, method: str, seed: int) -> dict[str, Any]:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    plan = plan_study(config)
    run = next((r for r in plan.trained_runs if r.method == method and r.seed == seed), None)
    if run is None:
        raise ValueError(f"the config plans no run of method {method!r} at seed {seed}; "
                         f"its methods: {sorted({r.method for r in plan.trained_runs})}")
    env = {**os.environ, "TQDM_DISABLE": "1"}
    for args in (["data", "--config", str(path)],
                 ["train", "--config", str(path), "--run", run.run_id, "--no-score", "--quiet"]):
        done = subprocess.run([sys.executable, "-m", "harness", *args], env=env,
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"python -m harness {' '.join(args)} failed (config {path}):\n"
                               f"{(done.stdout + done.stderr)[-3000:]}")
    return json.loads((Path(config["out_dir"]) / "runs" / run.run_id / "train.json").read_text())


def bench_ranks(config: dict[str, Any], out: Path, processes: int, method: str | None = None,
                steps: int | None = None) -> list[dict[str, Any]]:
    """Train the first seed's run of ``method`` (default: the config's first) on 1 and on
    ``processes`` ranks; write ``ranks.json`` and ``ranks.md`` under ``out``."""
    if processes < 2:
        raise ValueError(f"--processes {processes}: compare at least 2 ranks against 1")
    if method is None:
        first = config["methods"][0]
        method = first if isinstance(first, str) else first["name"]
    seed = config["train"]["seeds"][0]
    rows = []
    for n in (1, processes):
        cfg = copy.deepcopy(config)
        folder = out / f"processes-{n}"
        cfg["out_dir"] = str((folder / "out").resolve())
        cfg["train"]["processes"] = n
        cfg["train"]["seeds"] = [seed]
        if steps is not None:
            cfg["train"]["steps"] = steps
        cfg["train"]["checkpoint_every"] = 0
        cfg.pop("tune", None)  # a speed measurement: train.lr, no tune stage to wait for
        print(f"training {method} on {n} rank(s) in {folder} ...", file=sys.stderr)
        train = _train(cfg, folder, method, seed)
        rows.append({
            "processes": n,
            "global_batch": cfg["train"]["batch_size"],
            "steps": train["steps"],
            "median_step_s": train["timing"]["median_step_s"],
            "train_loop_s": train["timing"]["train_loop_s"],
            "final_loss": train["final_loss"],
        })
    one = rows[0]["median_step_s"]
    for row in rows:
        row["ratio_to_1"] = round(row["median_step_s"] / one, 3)
    device = config["model"].get("device", "auto")
    atomic_write_json(out / "ranks.json", {"method": method, "device": device, "rows": rows})
    shown = pd.DataFrame([{
        "processes": r["processes"], "global batch": r["global_batch"], "steps": r["steps"],
        "median step (s)": f"{r['median_step_s']:.4f}", "ratio to 1 rank": f"{r['ratio_to_1']:.2f}",
        "final loss": f"{r['final_loss']:.6f}"} for r in rows])
    text = (f"Step time of {method} on N data-parallel ranks against 1 at the same global batch "
            f"(device {device}; rank 0's median step from train.json).\n\n"
            + shown.to_markdown(index=False, disable_numparse=True) + "\n")
    atomic_write_text(out / "ranks.md", text)
    print(text)
    return rows
