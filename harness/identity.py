"""The harness's scoring against lm-eval's own: the untrained base model scored by lm-eval's
built-in ``hf`` model on the study's task YAMLs, next to the harness's base run.

The harness scores every run through :class:`harness.lm_model.HarnessLM` (cached lower
layers, adapters, routing records). For the base model the two must agree: same
log-likelihoods, so the same ``acc`` and ``acc_norm`` for every task. ``python -m harness
identity --config C`` writes ``<out_dir>/lm_eval_identity.json`` and ``.md`` with both
columns and their differences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lm_eval
from lm_eval.tasks import TaskManager

from harness.evaluate import suite_task_names
from harness.io import atomic_write_json, atomic_write_text, read_json
from harness.modeling import cache_root, resolve_model

METRICS = ("acc", "acc_norm")


def hf_scores(config: dict[str, Any], batch_size: int | None = None) -> dict[str, dict[str, float]]:
    """Per suite task, ``acc`` and ``acc_norm`` of the base model loaded by lm-eval's ``hf``
    model (float32, CPU) from the same checkpoint folder the harness uses."""
    data_dir = Path(config["out_dir"]) / "data"
    group, task_names = suite_task_names(data_dir)
    if group is None:
        raise ValueError("data.source lm_eval has no suite task folder; the identity check compares suite tasks")
    source = resolve_model(config["model"], cache_root(config))
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={source.path},dtype=float32,device=cpu",
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
        out[name.split("_", 1)[1]] = {m: r[f"{m},none"] for m in METRICS if f"{m},none" in r}
    return out


def compare_with_base(plan, batch_size: int | None = None) -> dict[str, Any]:
    """The base run's per-task scores (its ``metrics.json``) next to :func:`hf_scores`."""
    base = next((r for r in plan.runs if r.is_base), None)
    if base is None:
        raise ValueError("the study has no base run (eval.include_base: false); nothing to compare")
    metrics_path = plan.out_dir / "runs" / base.run_id / "metrics.json"
    if not metrics_path.exists():
        raise FileNotFoundError(
            f"{metrics_path}: the base run is not evaluated yet; run the study (or "
            f"`python -m harness evaluate --config <config> --run {base.run_id}`) first"
        )
    harness = read_json(metrics_path)["tasks"]
    reference = hf_scores(plan.config, batch_size)
    rows = []
    for task, ref in reference.items():
        for metric, value in ref.items():
            ours = harness[task][metric]
            rows.append({"task": task, "metric": metric, "harness": ours, "lm_eval_hf": value,
                         "difference": ours - value})
    return {
        "base_run": base.run_id,
        "model": plan.config["model"]["source"],
        "lm_eval_version": lm_eval.__version__,
        "max_abs_difference": max(abs(r["difference"]) for r in rows),
        "rows": rows,
    }


def write_identity(plan, report: dict[str, Any]) -> list[Path]:
    out = plan.out_dir
    lines = [
        f"# Base model: harness scoring vs lm-eval's `hf` model ({report['model']})",
        "",
        f"Base run `{report['base_run']}`; lm-eval {report['lm_eval_version']}; the same task YAMLs "
        f"(`{out}/data/tasks`). Largest |difference|: {report['max_abs_difference']:.6f}.",
        "",
        "| task | metric | harness | lm-eval hf | difference |",
        "|---|---|---|---|---|",
        *(f"| {r['task']} | {r['metric']} | {r['harness']:.4f} | {r['lm_eval_hf']:.4f} | {r['difference']:+.4f} |"
          for r in report["rows"]),
    ]
    atomic_write_json(out / "lm_eval_identity.json", report)
    atomic_write_text(out / "lm_eval_identity.md", "\n".join(lines) + "\n")
    return [out / "lm_eval_identity.json", out / "lm_eval_identity.md"]
