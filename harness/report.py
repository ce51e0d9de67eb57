"""Budget tables: the solver's rows as a pandas frame and as readable text."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

if TYPE_CHECKING:
    from harness.study import StudyPlan


def budget_frame(plan: StudyPlan) -> pd.DataFrame:
    records = []
    for row in plan.rows:
        d = row.as_dict()
        records.append(
            {
                "run": row.label,
                "method": d["method"],
                "variant": d["variant"],
                "G": d["granularity"],
                "experts": d.get("num_experts"),
                "expert_rank": d.get("expert_rank"),
                "top_k": d.get("top_k"),
                "extra": ", ".join(
                    f"{k}={v}" for k, v in d.items()
                    if k in row.description and k not in ("num_experts", "expert_rank", "top_k")
                ),
                **{k: d[k] for k in ("total", "activated", "router")},
                "total_vs_R": d["total_vs_R"],
                "activated_vs_K": d["activated_vs_K"],
                "router_mode": d["router_mode"],
                "verified": d["verified"],
                "note": d["note"],
                "seeds": len(plan.config["train"]["seeds"]),
            }
        )
    return pd.DataFrame.from_records(records)


def budget_table_text(plan: StudyPlan, frame: pd.DataFrame) -> str:
    cfg = plan.config
    budget = cfg["budget"]
    n_layers = len({s.name.split(".")[2] for s in plan.shapes if s.name.count(".") >= 2})
    head = (
        f"study {cfg['study']}: model {cfg['model']['source']}, "
        f"{len(plan.shapes)} adapted linear layers ({n_layers} decoder layers), "
        f"R = {budget['total_rank']}, K = {budget['active_rank']}, "
        f"router: {budget['router']}"
        + (f" (tolerance {budget['tolerance']:.0%})" if budget["router"] == "counted" else "")
        + f", seeds: {len(cfg['train']['seeds'])}"
    )
    shown = frame.copy()
    for col in ("total", "activated", "router"):
        shown[col] = shown[col].map(lambda v: f"{int(v):,}")
    for col in ("total_vs_R", "activated_vs_K"):
        shown[col] = shown[col].map(lambda v: f"{v:+.1%}")
    shown["verified"] = shown["verified"].map({True: "yes", False: "NO", None: "-"})
    shown = shown.drop(columns=["router_mode", "seeds", "method", "variant"])
    excl = " (excl. router)" if budget["router"] == "separate" else ""
    shown = shown.rename(
        columns={
            "expert_rank": "rank",
            "total_vs_R": "total vs LoRA-R" + excl,
            "activated_vs_K": "active vs LoRA-K" + excl,
            "verified": "numel ok",
        }
    )
    return head + "\n\n" + shown.to_string(index=False)
