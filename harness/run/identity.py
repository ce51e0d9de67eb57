"""The harness's scoring against lm-eval's own: lm-eval's built-in ``hf`` model on the study's
task YAMLs, next to the harness's scores of the same models.

The harness scores every run through :class:`harness.model.lm_eval_model.HarnessLM` (cached
lower layers, adapters, routing records). Two models are checked:

* the untrained **base model**: ``hf`` with ``pretrained=<the checkpoint folder>``;
* a trained **LoRA run** (the study's reference method, peft's own LoRA): its adapter is
  written as a peft adapter folder (``Method.export_peft``) and ``hf`` loads it with
  ``peft=<folder>``, so the adapter is applied by peft inside lm-eval, not by the harness.
  Its weights are restored first when they are not here (a fresh clone).

For both the scores must agree task by task (``acc``, ``acc_norm`` and every other
registered task metric both report). The harness side is the run's stored ``metrics.json``,
except when its weights had to be restored and the restore was not bit-identical (a run
trained on another CPU, whose last-bit differences grow over the steps): the stored scores
then belong to other weights, so the harness scores the restored weights again (nothing is
written to the run) and the report says so. ``python -m harness identity --config C`` writes
``<out_dir>/lm_eval_identity.json`` and ``.md`` with both columns and their differences.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager
from safetensors.torch import load_file

from harness.adapters import get_method
from harness.common.files import atomic_write_json, atomic_write_text, read_json
from harness.common.metrics import task_metrics
from harness.data.lm_eval_tasks import verify_task_folder
from harness.model.lm_eval_model import HarnessLM
from harness.model.load import cache_root, resolve_model
from harness.model.run_folder import write_run_spec
from harness.run.evaluate import suite_task_names
from harness.run.restore import restore_weights


def hf_scores(
    config: dict[str, Any], batch_size: int | None = None, peft: str | Path | None = None
) -> dict[str, dict[str, float]]:
    """Per suite task, every registered task metric of the model loaded by lm-eval's ``hf``
    model (float32, CPU) from the checkpoint folder the harness uses, with a peft adapter
    folder on top when ``peft`` is given."""
    source = resolve_model(config["model"], cache_root(config))
    model_args = f"pretrained={source.path},dtype=float32,device=cpu"
    if peft is not None:
        model_args += f",peft={peft}"
    return suite_scores(config, "hf", model_args, batch_size)


def harness_scores(config: dict[str, Any], run_dir: Path, batch_size: int | None = None) -> dict[str, dict[str, float]]:
    """Per suite task, every registered task metric of the run's weights as they are now,
    scored by the harness's own lm-eval model (nothing is written to the run)."""
    lm = HarnessLM(run_dir=str(run_dir), batch_size=batch_size or config["eval"]["batch_size"],
                   threads=config["train"]["threads"])
    return suite_scores(config, lm, None, batch_size)


def suite_scores(config: dict[str, Any], model, model_args: str | None, batch_size: int | None) -> dict[str, dict[str, float]]:
    """Per suite task, every registered task metric of ``model`` on the study's task YAMLs."""
    data_dir = Path(config["out_dir"]) / "data"
    group, task_names = suite_task_names(data_dir)
    if group is None:
        raise ValueError("data.source lm_eval has no suite task folder; the identity check compares suite tasks")
    verify_task_folder(data_dir / "tasks")  # nothing in it can make lm-eval run code
    results = lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=[group],
        task_manager=TaskManager(include_path=str(data_dir / "tasks"), include_defaults=False),
        batch_size=batch_size or config["eval"]["batch_size"],
        limit=config["eval"].get("limit"),
        random_seed=0,
        numpy_random_seed=1234,
        torch_random_seed=1234,
        fewshot_random_seed=1234,
        verbosity="WARNING",
    )
    out = {}
    for name in task_names:
        r = results["results"][name]
        out[name.split("_", 1)[1]] = {
            m.name: r[f"{m.name},none"] for m in task_metrics() if isinstance(r.get(f"{m.name},none"), (int, float))
        }
    return out


def _rows(model: str, run_id: str, harness: dict[str, Any], reference: dict[str, dict[str, float]]) -> list[dict]:
    return [
        {"model": model, "run": run_id, "task": task, "metric": metric, "harness": harness[task][metric],
         "lm_eval_hf": value, "difference": harness[task][metric] - value}
        for task, ref in reference.items()
        for metric, value in ref.items()
        if harness.get(task, {}).get(metric) is not None
    ]


def _scored(plan, run) -> dict[str, Any]:
    path = plan.run_dir(run) / "metrics.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path}: run {run.run_id} is not scored yet; run the study (or `python -m harness "
            f"train --config <config> --run {run.run_id}`) first"
        )
    return read_json(path)["tasks"]


def reference_run(plan, run_id: str | None = None):
    """The trained run the check scores both ways: ``run_id``, or the study's first run of its
    reference method (peft's LoRA)."""
    if run_id is not None:
        return plan.run(run_id)
    for run in plan.trained_runs:
        if get_method(run.method).is_reference:
            return run
    raise ValueError("the study runs no reference method (peft's LoRA); give a run with --run")


def compare(
    plan, batch_size: int | None = None, run_id: str | None = None, trained: bool = True
) -> dict[str, Any]:
    """The base run's and a LoRA run's per-task scores next to lm-eval ``hf``'s."""
    base = next((r for r in plan.runs if r.is_base), None)
    if base is None:
        raise ValueError("the study has no base run (eval.include_base: false); nothing to compare")
    rows = _rows("base model", base.run_id, _scored(plan, base), hf_scores(plan.config, batch_size))
    checked = [base.run_id]
    harness_side = "stored metrics.json"
    if trained:
        run = reference_run(plan, run_id)
        weights = plan.run_dir(run) / "adapter" / "adapter.safetensors"
        harness = _scored(plan, run)
        if not weights.exists():  # never committed: retrain them, checked against the stored log
            write_run_spec(plan.config, run, plan.run_dir(run))
            restore_weights(plan.config, run, plan.run_dir(run))
        restored = plan.run_dir(run) / "restore.json"
        record = read_json(restored) if restored.exists() else {}
        if record.get("restored") and not record.get("identical_losses"):
            # the stored scores are of the weights trained elsewhere: score these ones
            harness = harness_scores(plan.config, plan.run_dir(run), batch_size)
            harness_side = (
                f"the restored weights of {run.run_id} scored again (the restore was not bit-identical: "
                f"largest |loss difference| {record.get('max_abs_loss_diff', float('nan')):.4f} over "
                f"{record.get('steps_compared')} steps, so its stored scores belong to the weights trained "
                "where it first ran)"
            )
        method = get_method(run.method)
        source = resolve_model(plan.config["model"], cache_root(plan.config))
        with tempfile.TemporaryDirectory() as folder:
            method.export_peft(method.make_config(**run.method_config), load_file(str(weights)),
                               plan.shapes, folder, str(source.path))
            reference = hf_scores(plan.config, batch_size, peft=folder)
        rows += _rows(f"{method.label} (peft adapter)", run.run_id, harness, reference)
        checked.append(run.run_id)
    return {
        "runs": checked,
        "model": plan.config["model"]["source"],
        "lm_eval_version": lm_eval.__version__,
        "harness_side": harness_side,
        "max_abs_difference": max(abs(r["difference"]) for r in rows),
        "rows": rows,
    }


def write_identity(plan, report: dict[str, Any]) -> list[Path]:
    out = plan.out_dir
    lines = [
        f"# Harness scoring vs lm-eval's `hf` model ({report['model']})",
        "",
        f"Runs {', '.join(f'`{r}`' for r in report['runs'])}; lm-eval {report['lm_eval_version']}; the "
        f"same task YAMLs (`{out}/data/tasks`); the LoRA run's adapter loaded by lm-eval's `hf` "
        f"model with `peft=<its adapter as a peft folder>`. Largest |difference|: "
        f"{report['max_abs_difference']:.6f}. Harness side of the LoRA run: "
        f"{report.get('harness_side', 'stored metrics.json')}.",
        "",
        "| model | task | metric | harness | lm-eval hf | difference |",
        "|---|---|---|---|---|---|",
        *(f"| {r['model']} | {r['task']} | {r['metric']} | {r['harness']:.4f} | {r['lm_eval_hf']:.4f} | "
          f"{r['difference']:+.4f} |" for r in report["rows"]),
    ]
    atomic_write_json(out / "lm_eval_identity.json", report)
    atomic_write_text(out / "lm_eval_identity.md", "\n".join(lines) + "\n")
    return [out / "lm_eval_identity.json", out / "lm_eval_identity.md"]
