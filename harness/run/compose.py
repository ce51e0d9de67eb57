"""Build a staged method's run from existing component folders (its last stage only).

``python -m harness compose --method M --components DIR [DIR ...] --out RUN_DIR``
asks method ``M`` for a config over those folders (``Method.compose_config``: it checks
they fit together, naming the folder and field otherwise), then trains the run's last
stage in ``RUN_DIR`` with the components' own training settings, on the training items
of the data folder they were trained with (``--data-dir`` to override). ``RUN_DIR`` is
then an ordinary run folder: score it with
``lm_eval --model moe-lora --model_args run_dir=RUN_DIR``.

Inside a study the same happens through the DAG: change a staged method's options and
only the runs whose components changed are new.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from harness.adapters import ComponentError, get_method, read_component
from harness.model.run_folder import refuse_to_overwrite, write_run_spec
from harness.plan.config import validate_config
from harness.plan.study import Run
from harness.run.train import train_run


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["top_k=2", "router_lr=0.01"]`` -> ``{"top_k": 2, "router_lr": 0.01}`` (YAML values)."""
    out: dict[str, Any] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ComponentError(f"--option {pair!r}: expected KEY=VALUE, e.g. --option top_k=2")
        out[key.strip()] = yaml.safe_load(value)
    return out


def compose(
    method_name: str,
    component_dirs: list[str | Path],
    out: str | Path,
    options: dict[str, Any] | None = None,
    seed: int = 0,
    data_dir: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Build and train (last stage) a run of ``method_name`` in ``out`` from component folders."""

    method = get_method(method_name)
    folders = [Path(c).resolve() for c in component_dirs]
    infos = [read_component(f) for f in folders]
    method_config = method.compose_config(infos, dict(options or {}))
    first = infos[0]
    data = Path(data_dir) if data_dir is not None else Path(first.spec.get("data_dir") or "")
    if not (data / "train.jsonl").exists():
        raise ComponentError(
            f"{first.folder}: field 'data_dir' is {str(data)!r}, which has no train.jsonl; "
            "pass the data folder of the components' study with --data-dir"
        )
    if data.name != "data":
        raise ComponentError(f"--data-dir {str(data)!r}: expected a study's data folder (<out_dir>/data)")
    out = Path(out)
    refuse_to_overwrite(out / "train.json", "trained")
    effective = first.effective
    train = dict(effective.get("train") or {})
    train.setdefault("steps", effective.get("steps"))
    if train.get("steps") is None and train.get("epochs") is None:
        raise ComponentError(f"{first.folder}: neither 'steps' nor train 'epochs' recorded")
    targets = first.adapter.get("targets") or []
    config = validate_config(
        {
            "study": "compose",
            "out_dir": str(data.parent),
            "cache_dir": first.spec.get("cache_dir") or ".cache",
            "model": first.spec["model"],
            # the data settings the components were trained with (their content digest aside)
            "data": {k: v for k, v in (effective.get("data") or {"source": "generated"}).items() if k != "train_content"},
            "budget": {
                "total_rank": max(1, method_config.to_dict().get("expert_rank", 1)),
                "active_rank": 1,
                "granularities": [1],
            },
            "methods": [method_name],
            "plugins": list(first.spec.get("plugins") or []),
            "train": {**train, "seeds": [seed], "checkpoint_every": 0},
        },
        source="compose",
    )
    run_effective = {
        "model": effective.get("model"),
        "data": effective.get("data"),
        "train": train,
        "method": method_name,
        "method_config": method_config.to_dict(),
        "seed": seed,
        "components": [f.name for f in folders],
        "targets": targets,
    }
    run = Run(
        out.name,
        method_name,
        f"C{len(infos)}",  # composed of that many components
        len(infos),
        seed,
        method_config.to_dict(),
        run_effective,
        components=[os.fspath(f) for f in folders],
    )
    write_run_spec(config, run, out)
    return train_run(config, run, out, progress=progress)
