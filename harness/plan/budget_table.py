"""The budget table: the solver's rows as a pandas frame, rendered once for the console
(``python -m harness budget``) and for the study's tables (CSV, Markdown, LaTeX)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd

from harness.adapters import get_method
from harness.common.render import fmt_int, to_latex
from harness.plan.budget import verify_counts

if TYPE_CHECKING:
    from harness.plan.study import StudyPlan


def verified_budget(plan: StudyPlan) -> None:
    """Check every row's analytic counts against real adapter layers built on the ``meta``
    device (no weights); the result is in each row's ``verified_total``."""

    verify_counts(plan.rows, {row.method: get_method(row.method) for row in plan.rows}, plan.shapes)


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


def _display(plan: StudyPlan, frame: pd.DataFrame) -> pd.DataFrame:
    """The frame as the text every rendering shows."""
    shown = frame.drop(columns=["router_mode", "seeds", "method", "variant"]).copy()
    for col in ("total", "activated", "router"):
        shown[col] = shown[col].map(fmt_int)
    for col in ("total_vs_R", "activated_vs_K"):
        shown[col] = shown[col].map(lambda v: "–" if pd.isna(v) else f"{v:+.1%}")
    shown["verified"] = shown["verified"].map({True: "yes", False: "NO"}).fillna("–")
    shown = shown.astype(object).where(shown.notna(), "–").astype(str)
    excl = " (excl. router)" if plan.config["budget"]["router"] == "separate" else ""
    return shown.rename(
        columns={
            "expert_rank": "rank",
            "total_vs_R": "total vs LoRA-R" + excl,
            "activated_vs_K": "active vs LoRA-K" + excl,
            "verified": "numel ok",
        }
    )


def _caption(plan: StudyPlan) -> str:
    cfg = plan.config
    budget = cfg["budget"]
    n_layers = len({s.name.split(".")[2] for s in plan.shapes if s.name.count(".") >= 2})
    return (
        f"Study {cfg['study']}: parameter budget per run; model {cfg['model']['source']}, "
        f"{len(plan.shapes)} adapted linear layers ({n_layers} decoder layers), "
        f"R = {budget['total_rank']}, K = {budget['active_rank']}, router: {budget['router']}"
        + (f" (tolerance {budget['tolerance']:.0%})" if budget["router"] == "counted" else "")
        + f", seeds: {len(cfg['train']['seeds'])}. The 'vs' columns are relative deviations "
        "from the reference LoRA at rank R and rank K"
        + (" (router excluded, listed beside)." if budget["router"] == "separate" else " (router included).")
    )


def budget_table_text(plan: StudyPlan, frame: pd.DataFrame) -> str:
    """The console form (``python -m harness budget``)."""
    return _caption(plan) + "\n\n" + _display(plan, frame).to_string(index=False)


def budget_table_texts(plan: StudyPlan, frame: pd.DataFrame) -> dict[str, str]:
    """``{"csv", "md", "tex"}`` of the budget table."""
    shown = _display(plan, frame)
    caption = _caption(plan)
    return {
        "csv": frame.to_csv(index=False),
        "md": caption + "\n\n" + shown.to_markdown(index=False) + "\n",
        "tex": to_latex(shown, caption, "tab:budget"),
    }
