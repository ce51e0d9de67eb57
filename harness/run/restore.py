"""Rebuilding the weights of a finished run (weights are never committed): retrain it
deterministically from its ``run.json`` in a scratch folder and check every logged loss
against the stored ``train_log.jsonl``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from harness.common.files import atomic_write_json
from harness.common.manifest import record_files
from harness.common.provenance import provenance
from harness.run.train import train_run


def restore_weights(config: dict[str, Any], run, run_dir: Path, progress: bool = False) -> dict[str, Any]:
    """Rebuild the weights of a finished run (or component) whose ``adapter/`` is missing:
    retrain it from its run.json in a scratch folder (same config, seed and batch order),
    compare every logged loss with the stored ``train_log.jsonl``, install the weights and
    write ``restore.json`` (the comparison and provenance). ``train.json`` and the stored
    log are left as they are. On the machine that trained the run the losses are identical;
    elsewhere, top-k routing can turn ulp-level drift into different choices, which
    ``restore.json`` reports as such."""

    stored_log = run_dir / "train_log.jsonl"
    if not (run_dir / "train.json").exists() or not stored_log.exists():
        raise FileNotFoundError(
            f"{run_dir}: not a finished run (train.json or train_log.jsonl is missing): train it "
            "with `python -m harness train`"
        )
    if (run_dir / "adapter" / "adapter.safetensors").exists():
        record = {"run_id": run.run_id, "restored": False, "reason": "weights already present"}
        atomic_write_json(run_dir / "restore.json", record)  # the restore rule's output
        return record
    scratch = run_dir / ".restore"
    shutil.rmtree(scratch, ignore_errors=True)
    summary = train_run(config, run, scratch, progress=progress)
    stored = [json.loads(line)["loss"] for line in stored_log.read_text().splitlines() if line.strip()]
    again = [json.loads(line)["loss"] for line in (scratch / "train_log.jsonl").read_text().splitlines() if line.strip()]
    diffs = [abs(a - b) for a, b in zip(stored, again)]
    record = {
        "run_id": run.run_id,
        "restored": True,
        "steps_compared": len(diffs),
        "steps_stored": len(stored),
        "identical_losses": len(stored) == len(again) and max(diffs, default=0.0) == 0.0,
        "max_abs_loss_diff": max(diffs, default=0.0),
        "stored_final_loss": json.loads((run_dir / "train.json").read_text()).get("final_loss"),
        "restored_final_loss": summary["final_loss"],
        "provenance": provenance(),
    }
    target = run_dir / "adapter"
    shutil.rmtree(target, ignore_errors=True)
    (scratch / "adapter").replace(target)
    shutil.rmtree(scratch, ignore_errors=True)
    record_files(run_dir, ["adapter/adapter.safetensors", "adapter/adapter.json"])  # what scoring verifies
    atomic_write_json(run_dir / "restore.json", record)
    return record
