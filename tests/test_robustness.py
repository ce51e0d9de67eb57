"""The robustness table: each condition's headline comparisons read exactly as that study's
own significance table, missing studies are shown (never dropped), bad specs are named."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from harness.analysis.robustness import Condition, read_spec, robustness_markdown, robustness_table

ROOT = Path(__file__).resolve().parents[1]


def test_a_spec_without_conditions_or_with_a_missing_config_is_named(tmp_path):
    spec = tmp_path / "r.yaml"
    spec.write_text("out: x\n")
    with pytest.raises(ValueError, match=r"r.yaml: 'conditions' must be a non-empty list"):
        read_spec(spec)
    spec.write_text("conditions:\n  - {study: s, condition: c}\n")
    with pytest.raises(ValueError, match=r"conditions\[0\] lacks \['config'\]"):
        read_spec(spec)
    spec.write_text("conditions:\n  - {study: s, condition: c, config: nowhere.yaml}\n")
    with pytest.raises(ValueError, match=r"conditions\[0\]\.config 'nowhere\.yaml' does not exist"):
        read_spec(spec)
    with pytest.raises(ValueError, match=r"robustness spec '.*absent.yaml' does not exist \(run from the repository root"):
        read_spec(tmp_path / "absent.yaml")


def test_cells_equal_the_committed_significance_table_and_missing_runs_are_shown(tmp_path):
    cwd = Path.cwd()
    os.chdir(ROOT)
    try:
        empty = tmp_path / "empty.yaml"
        empty.write_text((ROOT / "config/synthetic.yaml").read_text().replace(
            "out_dir: results/synthetic", f"out_dir: {tmp_path / 'nothing'}"))
        conditions = [Condition("synthetic", "shared rate", "config/synthetic.yaml"),
                      Condition("synthetic", "nothing run", str(empty))]
        table = robustness_table(conditions)
        text = robustness_markdown(table, conditions)
    finally:
        os.chdir(cwd)
    committed = pd.read_csv(ROOT / "results/synthetic/tables/significance.csv")
    done = table[table["condition"] == "shared rate"]
    coarse = committed[committed["comparison"] == "finest vs coarsest G"]
    assert set(done[done["comparison"] == "finest vs coarsest G"]["method"]) == set(coarse["method"])
    for _, row in done[done["comparison"] == "finest vs coarsest G"].iterrows():
        ref = coarse[coarse["method"] == row["method"]].iloc[0]
        assert row["diff"] == pytest.approx(ref["diff"]) and row["ci_low"] == pytest.approx(ref["ci_low"])
        assert row["verdict"] == ref["verdict"]
    vs_lora = done[done["comparison"] == "finest G vs LoRA rank R"]
    assert set(vs_lora["label"].str.contains("G=24")) == {True}
    missing = table[table["condition"] == "nothing run"]
    assert len(missing) == 1 and missing["cell"].iloc[0].startswith("not run")
    assert "*nothing run*: not run" in text and "| sira" in text
