"""Does a headline survive its confounds? The same comparisons, study by study, under each
condition a robustness spec lists (``config/robustness.yaml``).

Each condition is a study of its own (its own config, ``out_dir`` and runs); the table
puts, for every method run at several granularities, two comparisons of each study's
significance family (:func:`harness.analysis.comparisons.significance_table`) side by side:

* ``finest vs coarsest G``: the granularity headline;
* ``finest G vs LoRA rank R``: the method against a LoRA with the same total parameters.

A cell is the difference in suite points with its 95% interval (paired bootstrap over
seeds and test items within tasks, as the study's own significance table) and the
study's Holm verdict; each study is corrected over its own family, so a cell reads
exactly as that study's ``significance.md`` row. A condition whose runs are missing is
shown as such, never dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from harness.analysis.comparisons import significance_table
from harness.analysis.results import MissingResultsError, collect_results
from harness.common.files import atomic_write_text
from harness.plan.config import ConfigError
from harness.plan.study import plan_from_file

COMPARISONS = ("finest vs coarsest G", "vs LoRA rank R")


@dataclass(frozen=True)
class Condition:
    study: str  # the question's data (e.g. multitask, synthetic)
    condition: str  # what was changed (e.g. "router counted")
    config: str  # the study config that runs it


def read_spec(path: Path | str) -> tuple[list[Condition], Path]:
    """``(conditions, out folder)`` from a spec ``{out, conditions: [{study, condition, config}]}``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"robustness spec {str(path)!r} does not exist (run from the repository root, "
                                "or pass --spec FILE holding {out, conditions: [{study, condition, config}]})")
    spec = yaml.safe_load(path.read_text()) or {}
    if not isinstance(spec.get("conditions"), list) or not spec["conditions"]:
        raise ConfigError(f"{path}: 'conditions' must be a non-empty list of {{study, condition, config}}")
    conditions = []
    for i, entry in enumerate(spec["conditions"]):
        missing = {"study", "condition", "config"} - set(entry or {})
        if missing:
            raise ConfigError(f"{path}: conditions[{i}] lacks {sorted(missing)} (needs study, condition, config)")
        if not Path(entry["config"]).is_file():
            raise ConfigError(f"{path}: conditions[{i}].config {entry['config']!r} does not exist")
        conditions.append(Condition(str(entry["study"]), str(entry["condition"]), str(entry["config"])))
    return conditions, Path(spec.get("out", "results/robustness"))


def _cell(row: pd.Series) -> str:
    if pd.isna(row.get("diff")):
        return str(row.get("verdict", "–"))
    verdict = row["verdict"] if row["verdict"] != "no difference detected" else "no difference"
    return f"{row['diff']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}] {verdict}"


def condition_rows(cond: Condition) -> list[dict[str, Any]]:
    """The headline comparisons of one condition's study (``[]``-free: a study whose results
    are missing gives one row saying so)."""
    _, plan = plan_from_file(cond.config)
    try:
        results = collect_results(plan)
    except MissingResultsError as err:
        return [{"study": cond.study, "condition": cond.condition, "config": cond.config,
                 "method": None, "comparison": None, "cell": "not run: " + str(err).splitlines()[0]}]
    table = significance_table(results, "methods")
    finest = {}
    for _, row in table[table["comparison"] == "finest vs coarsest G"].iterrows():
        finest[row["method"]] = row["variant"]
    rows = []
    for _, row in table.iterrows():
        if row["comparison"] == "finest vs coarsest G":
            name = "finest vs coarsest G"
        elif row["comparison"] == "vs LoRA rank R" and finest.get(row["method"]) == row["variant"]:
            name = "finest G vs LoRA rank R"
        else:
            continue
        rows.append({"study": cond.study, "condition": cond.condition, "config": cond.config,
                     "method": row["method"], "comparison": name, "label": row["label"],
                     "versus": row["versus"], "n_seeds": row["n_seeds"], "diff": row["diff"],
                     "ci_low": row["ci_low"], "ci_high": row["ci_high"], "p_holm": row["p_holm"],
                     "verdict": row["verdict"], "cell": _cell(row)})
    return rows


def robustness_table(conditions: list[Condition]) -> pd.DataFrame:
    """Long form: one row per (study, condition, method, comparison)."""
    records = [r for cond in conditions for r in condition_rows(cond)]
    return pd.DataFrame.from_records(records)


def robustness_markdown(table: pd.DataFrame, conditions: list[Condition]) -> str:
    parts = [
        "Each headline comparison under each condition (one study per condition). Cell: "
        "difference in suite points (%), 95% interval (paired bootstrap: seeds drawn with "
        "replacement, test items within tasks), the study's Holm verdict over its own family. "
        "\"finest G vs LoRA rank R\": the method's finest granularity against LoRA with the "
        "same total parameters.",
    ]
    for study in dict.fromkeys(c.study for c in conditions):
        sub = table[table["study"] == study]
        order = [c.condition for c in conditions if c.study == study]
        parts.append(f"### {study}\n\nconfigs: " + ", ".join(
            f"{c.condition} = `{c.config}`" for c in conditions if c.study == study))
        missing = sub[sub["method"].isna()]
        for _, row in missing.iterrows():
            parts.append(f"*{row['condition']}*: {row['cell']}")
        done = sub[sub["method"].notna()]
        if done.empty:
            continue
        wide = done.pivot_table(index=["method", "comparison"], columns="condition", values="cell",
                                aggfunc="first").reindex(columns=[c for c in order if c in set(done["condition"])])
        wide = wide.fillna("not in this condition").reset_index()
        parts.append(wide.to_markdown(index=False))
    return "\n\n".join(parts) + "\n"


def write_robustness(spec: Path | str) -> list[Path]:
    conditions, out = read_spec(spec)
    table = robustness_table(conditions)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / "robustness.csv", out / "robustness.md"
    atomic_write_text(csv, table.drop(columns=["cell"], errors="ignore").to_csv(index=False))
    atomic_write_text(md, robustness_markdown(table, conditions))
    return [csv, md]
