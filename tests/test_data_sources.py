"""Data in the shapes researchers have (harness.data.sources): JSONL, CSV, parquet, a
``save_to_disk`` folder and a ``datasets.load_dataset`` dataset give the same items through a
field mapping; string labels become choice indices; errors name the file, row and value;
the committed JSONL data reads exactly as before."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pandas as pd
import pytest

from harness.data import tasks as data_tasks
from harness.data.jsonl import DataError, validated_lines
from harness.data.prepare import prepare_data
from harness.data.sources import read_items
from harness.plan.config import ConfigError, validate_config

ROOT = Path(__file__).resolve().parents[1]

# the data's own names: a question field "prompt", choices "options", the answer as text
ROWS = [
    {"prompt": "2 + 2 =", "options": ["3", "4", "5"], "gold": "4", "subject": "math"},
    {"prompt": "Sky colour?", "options": ["blue", "green"], "gold": "blue", "subject": "world"},
    {"prompt": "3 + 3 =", "options": ["6", "7"], "gold": "6", "subject": "math", "source": "made up"},
]
FIELDS = {"question": "prompt", "choices": "options", "label": "gold", "task": "subject"}
EXPECTED = [
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "label": 1, "task": "math"},
    {"question": "Sky colour?", "choices": ["blue", "green"], "label": 0, "task": "world"},
    {"question": "3 + 3 =", "choices": ["6", "7"], "label": 0, "task": "math", "source": "made up"},
]


def _files_cfg(train, test, fields=FIELDS) -> dict:
    return {"source": "files", "train": str(train), "test": str(test), "fields": fields}


def _write_all(folder: Path) -> dict[str, Path]:
    jsonl = folder / "d.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    csv = folder / "d.csv"  # choices as a JSON list in one cell; the missing "source" is an empty cell
    pd.DataFrame([{**r, "options": json.dumps(r["options"])} for r in ROWS]).to_csv(csv, index=False)
    parquet = folder / "d.parquet"
    pd.DataFrame(ROWS).to_parquet(parquet)
    disk = folder / "disk"
    datasets.Dataset.from_pandas(pd.DataFrame(ROWS)).save_to_disk(str(disk))
    return {"jsonl": jsonl, "csv": csv, "parquet": parquet, "disk": disk}


def test_jsonl_csv_parquet_and_a_save_to_disk_folder_give_the_same_items(tmp_path):
    paths = _write_all(tmp_path)
    for kind, path in paths.items():
        items = [item for _, item in read_items(_files_cfg(path, path), "train")]
        # parquet and datasets fill a missing field with null: read as absent, like CSV's empty cell
        assert items == EXPECTED, kind
    where = [w for w, _ in read_items(_files_cfg(paths["csv"], paths["csv"]), "test")]
    assert where == [f"{paths['csv']}: row {i}" for i in (1, 2, 3)]
    assert [w for w, _ in read_items(_files_cfg(paths["jsonl"], paths["jsonl"]), "test")][1] == f"{paths['jsonl']}:2"


def test_choice_columns_and_letter_labels(tmp_path):
    path = tmp_path / "mmlu_like.csv"
    pd.DataFrame([{"q": "Pick b", "A": "a", "B": "b", "C": "c", "answer": "B"},
                  {"q": "Pick c", "A": "a", "B": "b", "C": "c", "answer": "2"}]).to_csv(path, index=False)
    items = [it for _, it in read_items(_files_cfg(path, path, {"question": "q", "choices": ["A", "B", "C"],
                                                                  "label": "answer"}), "train")]
    # the file's stem names the task; a CSV label may be an index written as text
    assert items == [{"question": "Pick b", "choices": ["a", "b", "c"], "label": 1, "task": "mmlu_like"},
                     {"question": "Pick c", "choices": ["a", "b", "c"], "label": 2, "task": "mmlu_like"}]


def test_a_label_that_is_not_a_choice_names_file_row_and_value(tmp_path):
    path = tmp_path / "bad.csv"
    rows = [{**r, "options": json.dumps(r["options"])} for r in ROWS]
    rows[1]["gold"] = "purple"
    pd.DataFrame(rows).to_csv(path, index=False)
    with pytest.raises(DataError) as e:
        read_items(_files_cfg(path, path), "train")
    assert str(e.value).startswith(f"{path}: row 2: label 'purple' is not among the choices")
    assert "['blue', 'green']" in str(e.value)
    parquet = tmp_path / "bad.parquet"
    pd.DataFrame([{"question": "q", "choices": ["a", "b"], "label": 5}]).to_parquet(parquet)
    with pytest.raises(DataError, match=r"bad\.parquet: row 1: label 5 out of range for 2 choices"):
        read_items(_files_cfg(parquet, parquet, None), "train")


def test_format_errors_are_named(tmp_path):
    with pytest.raises(DataError, match=r"a.txt: file not found"):
        read_items(_files_cfg(tmp_path / "a.txt", tmp_path / "a.txt"), "train")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a.txt: unknown data format '\.txt'; valid: \.jsonl, \.json, \.csv, \.parquet"):
        read_items(_files_cfg(tmp_path / "a.txt", tmp_path / "a.txt"), "train")
    both = tmp_path / "dd"
    split = datasets.Dataset.from_pandas(pd.DataFrame(ROWS))
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(both))
    with pytest.raises(DataError, match=rf"a DatasetDict with splits train, test; point data.train / data.test at one split's folder \(e.g. {both}/train\)"):
        read_items(_files_cfg(both, both), "train")
    # a split's own folder is a Dataset folder
    assert [it for _, it in read_items(_files_cfg(both / "train", both / "test"), "train")] == EXPECTED
    with pytest.raises(DataError, match=r"data.fields has unknown key\(s\) 'questoin'"):
        read_items(_files_cfg(both / "train", both / "test", {"questoin": "q"}), "train")
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"question": "q", "choices": ["a", "b"], "label": 0, "task": "t"}\n\n'
                     '{"question": "q2", "answer": "x", "task": "t"}\n')
    with pytest.raises(DataError, match=rf"{mixed}:3: a generation item in task 't', whose first item \({mixed}:1\) is a multiple-choice item"):
        read_items(_files_cfg(mixed, mixed, None), "train")


def test_a_datasets_dataset_by_name_and_a_missing_one_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    repo = tmp_path / "my_dataset"  # a dataset folder load_dataset reads by name, as a hub id
    (repo / "data").mkdir(parents=True)
    pd.DataFrame(ROWS[:2]).to_parquet(repo / "data" / "train.parquet")
    pd.DataFrame(ROWS[:1]).to_parquet(repo / "data" / "test.parquet")  # the same columns
    cfg = {"source": "hub", "dataset": str(repo), "fields": FIELDS}
    assert [it for _, it in read_items(cfg, "train")] == EXPECTED[:2]
    where, item = read_items(cfg, "test")[0]
    assert item == EXPECTED[0] and where == f"{repo} split test: row 1"
    assert datasets.config.HF_DATASETS_OFFLINE  # conftest: never download
    with pytest.raises(DataError) as e:
        read_items({"source": "hub", "dataset": "nobody/no_such_dataset"}, "train")
    assert "data.dataset 'nobody/no_such_dataset' is not in the local datasets cache" in str(e.value)
    assert "HF_DATASETS_OFFLINE=1" in str(e.value)


def test_the_committed_jsonl_data_reads_as_before_and_keeps_its_digests(monkeypatch):
    cfg = {"source": "jsonl", "train": str(ROOT / "data/multitask/train.jsonl"),
           "test": str(ROOT / "data/multitask/test.jsonl")}
    before = [(f"{cfg['train']}:{n}", {**obj, "task": obj.get("task", "test")})
              for n, obj in validated_lines(Path(cfg["train"]))]
    assert read_items(cfg, "train") == before
    summary = json.loads((ROOT / "results/multitask-mola/data/data_summary.json").read_text())
    rel = {"source": "jsonl", "train": "data/multitask/train.jsonl", "test": "data/multitask/test.jsonl"}
    monkeypatch.chdir(ROOT)  # the committed study's paths are relative to the repository
    assert data_tasks.training_data_digest(rel) == summary["train_content"]
    general = "data/wikitext2/test.jsonl"
    assert data_tasks.test_data_digest({"data": rel, "eval": {"general_text": general}}) == summary["test_content"]


def test_the_data_step_and_config_take_a_csv_with_renamed_fields(tmp_path):
    paths = _write_all(tmp_path)
    config = validate_config({
        "study": "s", "model": {"source": "tiny-random"},
        "data": _files_cfg(paths["csv"], paths["parquet"]),
        "budget": {"total_rank": 2, "active_rank": 1, "granularities": [1]}, "methods": ["lora"],
    })
    summary = prepare_data(config["data"], tmp_path / "out")
    assert summary["train_counts"] == {"math": 2, "world": 1}
    assert summary["fields"] == FIELDS and summary["primary_metric"] == {"math": "acc", "world": "acc"}
    written = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert written == EXPECTED
    with pytest.raises(ConfigError, match=r"data\.source is hub, so data\.dataset"):
        validate_config({**config, "data": {"source": "hub"}})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) 'anwser' \(did you mean 'answer'\?\) in data.fields"):
        validate_config({**config, "data": {**config["data"], "fields": {"anwser": "x"}}})
