"""Rendering tables: numbers to text, Markdown and LaTeX (one place for every table)."""

from __future__ import annotations

from typing import Any

import pandas as pd

#: decimals shown for accuracies (percent) in Markdown and LaTeX
ACC_DECIMALS = 1


def best_cells(
    frame: pd.DataFrame, columns: list[str], decimals: int = ACC_DECIMALS
) -> dict[str, set]:
    """For each column, the row indices holding its maximum at the displayed precision
    (ties all count); NaN never wins."""
    out: dict[str, set] = {}
    for col in columns:
        values = frame[col].astype(float).round(decimals)
        if values.notna().any():
            out[col] = set(values.index[values == values.max()])
        else:
            out[col] = set()
    return out


def fmt_acc(v: float) -> str:
    return "–" if pd.isna(v) else f"{v:.{ACC_DECIMALS}f}"


def fmt_int(v: Any) -> str:
    return "–" if pd.isna(v) else f"{int(v):,}"


def fmt_seconds(v: float) -> str:
    return "–" if pd.isna(v) else f"{v:.1f}"


def md_bold(text: str) -> str:
    return f"**{text}**"


_TEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    "–": "--",
    "≤": r"$\leq$",
    "≥": r"$\geq$",
    "×": r"$\times$",
    "−": "--",
}


def tex_escape(text: Any) -> str:
    """Escape LaTeX's special characters (underscores included) in one cell or header."""
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(text))


#: columns set flush left in LaTeX (the rest, numbers, flush right)
TEXT_COLUMNS = {
    "method",
    "variant",
    "run",
    "extra",
    "note",
    "router_mode",
    "accounting",
    "comparison",
    "versus",
    "verdict",
    "suite mean ± std",
}


def to_latex(shown: pd.DataFrame, caption: str, label: str, escaped: bool = False) -> str:
    frame = shown.copy()
    if not escaped:
        frame = frame.map(tex_escape)
    frame.columns = [tex_escape(c) for c in frame.columns]
    return frame.to_latex(
        index=False,
        escape=False,
        caption=tex_escape(caption),
        label=label,
        column_format="".join(
            "l" if i == 0 or str(c) in TEXT_COLUMNS else "r" for i, c in enumerate(shown.columns)
        ),
    )
