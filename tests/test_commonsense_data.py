"""The committed commonsense slices (``data/commonsense/``) are well formed and as documented.

Checks only the committed files (nothing is generated or downloaded): every line is
a valid item of the harness's JSONL format, each task has exactly its documented
number of items in each split, the tasks are grouped in the documented order, no
item is repeated within a split or shared between training and test, and each
file's sha256 is the one recorded in ``SOURCES.md``. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "commonsense"
TASKS = ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "csqa2", "winogrande")
COUNTS = {"train": 300, "test": 200}
SPLITS = tuple(COUNTS)
FIELDS = {"question", "choices", "label", "task"}


def _load(split: str) -> list[dict]:
    text = (DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{split}.jsonl must end with a newline"
    return [json.loads(line) for line in text.split("\n") if line.strip()]


@pytest.fixture(scope="module")
def items() -> dict[str, list[dict]]:
    return {split: _load(split) for split in SPLITS}


def _key(item: dict) -> tuple[str, tuple[str, ...]]:
    return item["question"], tuple(item["choices"])


@pytest.mark.parametrize("split", SPLITS)
def test_every_line_is_a_valid_item(items, split):
    for i, it in enumerate(items[split], start=1):
        where = f"{split}.jsonl:{i}"
        assert isinstance(it, dict) and set(it) == FIELDS, f"{where}: fields {sorted(it)}"
        assert isinstance(it["question"], str) and it["question"].strip(), where
        choices = it["choices"]
        assert isinstance(choices, list) and len(choices) >= 2, where
        assert all(isinstance(c, str) and c.strip() for c in choices), where
        assert len(set(choices)) == len(choices), f"{where}: repeated choice"
        label = it["label"]
        assert isinstance(label, int) and not isinstance(label, bool), where
        assert 0 <= label < len(choices), where
        assert it["task"] in TASKS, f"{where}: task {it['task']!r}"
        assert re.fullmatch(r"[a-z0-9_]+", it["task"]), where


@pytest.mark.parametrize("split", SPLITS)
def test_exact_counts_per_task(items, split):
    counts = Counter(it["task"] for it in items[split])
    assert counts == {task: COUNTS[split] for task in TASKS}


@pytest.mark.parametrize("split", SPLITS)
def test_tasks_are_grouped_in_documented_order(items, split):
    order = [it["task"] for it in items[split]]
    runs = [t for i, t in enumerate(order) if i == 0 or order[i - 1] != t]
    assert tuple(runs) == TASKS


@pytest.mark.parametrize("split", SPLITS)
def test_no_duplicates_within_a_split(items, split):
    keys = [_key(it) for it in items[split]]
    assert len(set(keys)) == len(keys)


def test_no_overlap_between_train_and_test(items):
    train = {_key(it) for it in items["train"]}
    test = {_key(it) for it in items["test"]}
    assert not train & test
    # Stricter, as documented: no training question text is also a test question text.
    assert not {q for q, _ in train} & {q for q, _ in test}


def test_choice_sets_per_task(items):
    both = items["train"] + items["test"]
    by_task: dict[str, set[tuple[str, ...]]] = {}
    for it in both:
        by_task.setdefault(it["task"], set()).add(tuple(it["choices"]))
    assert by_task["commonsense_qa"] == {("A", "B", "C", "D", "E")}
    assert by_task["csqa2"] == {("no", "yes")}
    assert all(len(c) == 2 for c in by_task["winogrande"])


def test_files_match_sha256_recorded_in_sources():
    sources = (DATA_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for split in SPLITS:
        name = f"{split}.jsonl"
        recorded = re.search(rf"`{re.escape(name)}`[^\n]*?`([0-9a-f]{{64}})`", sources)
        assert recorded, f"SOURCES.md records no sha256 for {name}"
        actual = hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest()
        assert actual == recorded.group(1), f"{name} differs from the recorded sha256"
