"""The committed multi-task slices (``data/multitask/``) are well formed and as documented.

Checks only the committed files (nothing is generated or downloaded): every line is
a valid item of the harness's JSONL format with its task's fixed label words and
family, each task has exactly its documented number of items and test labels, the
tasks are grouped in the documented order, every training slice is label-balanced,
every prompt is at most 600 characters, no item is repeated within a split, no test
item is in training (neither the question text nor the underlying text: the
sentence, or the sentence pair in either order, recovered from the question; for
every task but SICK not even one sentence), and each file's sha256 is the one
recorded in ``SOURCES.md``. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "multitask"
SPLITS = ("train", "test")
FIELDS = {"question", "choices", "label", "task", "family"}
MAX_PROMPT_CHARS = 600
PROMPT_SUFFIX = "\nAnswer:"

# task -> (family, label words), in the documented order
TASKS = {
    "sst2": ("sentiment", ["negative", "positive"]),
    "ag_news": ("topic", ["World", "Sports", "Business", "Science"]),
    "trec": ("topic", ["abbreviation", "entity", "description", "person", "location", "number"]),
    "rte": ("nli", ["True", "False"]),
    "cb": ("nli", ["True", "False", "Neither"]),
    "sick": ("nli", ["True", "False", "Neither"]),
    "mrpc": ("paraphrase", ["no", "yes"]),
    "copa": ("reasoning", ["first", "second"]),
    "wic": ("word_sense", ["no", "yes"]),
}
# task -> (training items, test items), as documented in SOURCES.md
COUNTS = {
    "sst2": (600, 500),
    "ag_news": (600, 500),
    "trec": (504, 500),
    "rte": (600, 241),
    "cb": (45, 49),
    "sick": (600, 500),
    "mrpc": (600, 500),
    "copa": (388, 100),
    "wic": (600, 500),
}
# task -> test label counts (index 0, 1, ...), as documented in SOURCES.md
TEST_LABELS = {
    "sst2": [251, 249],
    "ag_news": [124, 113, 136, 127],
    "trec": [9, 94, 138, 65, 81, 113],
    "rte": [129, 112],
    "cb": [21, 24, 4],
    "sick": [125, 79, 296],
    "mrpc": [173, 327],
    "copa": [55, 45],
    "wic": [261, 239],
}
# tasks whose training items may share single sentences (not pairs) with test items
SENTENCE_REUSE_ALLOWED = {"sick"}

_NLI3 = r"(?P<a>.+)\nQuestion: (?P<b>.+)\. True, False, or Neither\?"
TEMPLATES = {
    "sst2": r"Review: (?P<a>.+)\nIs the sentiment of this review negative or positive\?",
    "ag_news": r"Article: (?P<a>.+)\n"
    r"Which topic is this article about: World, Sports, Business or Science\?",
    "trec": r"Question: (?P<a>.+)\nIs the answer to this question an abbreviation, an entity, "
    r"a description, a person, a location or a number\?",
    "rte": r"(?P<a>.+)\nQuestion: (?P<b>.+) True or False\?",
    "cb": _NLI3,
    "sick": _NLI3,
    "mrpc": r"Sentence 1: (?P<a>.+)\nSentence 2: (?P<b>.+)\n"
    r"Question: Do both sentences mean the same thing\?",
    "copa": r"Premise: (?P<a>.+)\nFirst alternative: (?P<b>.+)\nSecond alternative: (?P<c>.+)\n"
    r"Question: Which alternative is the more plausible (?:cause|effect) of the premise, "
    r"the first or the second\?",
    "wic": r"Sentence 1: (?P<a>.+)\nSentence 2: (?P<b>.+)\n"
    r"Question: Is the word '(?P<w>[^']+)' used in the same way in the two sentences above\?",
}


def _load(split: str) -> list[dict]:
    text = (DATA_DIR / f"{split}.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{split}.jsonl must end with a newline"
    return [json.loads(line) for line in text.split("\n") if line.strip()]


@pytest.fixture(scope="module")
def items() -> dict[str, list[dict]]:
    return {split: _load(split) for split in SPLITS}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _sentences(item: dict) -> tuple[str, ...]:
    """The underlying sentence(s) of an item, recovered from its question text."""
    m = re.fullmatch(TEMPLATES[item["task"]], item["question"], flags=re.DOTALL)
    assert m, f"{item['task']}: question does not follow its template: {item['question']!r}"
    return tuple(_norm(m.group(g)) for g in ("a", "b", "c") if g in m.groupdict())


def _text_key(item: dict) -> tuple[str, ...]:
    return tuple(sorted(_sentences(item)))


@pytest.mark.parametrize("split", SPLITS)
def test_every_line_is_a_valid_item(items, split):
    for i, it in enumerate(items[split], start=1):
        where = f"{split}.jsonl:{i}"
        assert isinstance(it, dict) and set(it) == FIELDS, f"{where}: fields {sorted(it)}"
        assert isinstance(it["question"], str) and it["question"].strip(), where
        assert it["task"] in TASKS, f"{where}: task {it['task']!r}"
        family, choices = TASKS[it["task"]]
        assert it["family"] == family, where
        assert it["choices"] == choices, f"{where}: choices {it['choices']!r}"
        label = it["label"]
        assert isinstance(label, int) and not isinstance(label, bool), where
        assert 0 <= label < len(choices), where
        assert len(it["question"]) + len(PROMPT_SUFFIX) <= MAX_PROMPT_CHARS, where
        _sentences(it)  # follows its task's template


def test_label_words_are_distinct_single_words():
    for task, (_, choices) in TASKS.items():
        assert len(set(choices)) == len(choices), task
        assert all(re.fullmatch(r"[A-Za-z]+", c) for c in choices), task


@pytest.mark.parametrize("split", SPLITS)
def test_exact_counts_per_task(items, split):
    counts = Counter(it["task"] for it in items[split])
    column = SPLITS.index(split)
    assert counts == {task: COUNTS[task][column] for task in TASKS}


@pytest.mark.parametrize("split", SPLITS)
def test_tasks_are_grouped_in_documented_order(items, split):
    order = [it["task"] for it in items[split]]
    runs = [t for i, t in enumerate(order) if i == 0 or order[i - 1] != t]
    assert tuple(runs) == tuple(TASKS)


def test_training_slices_are_label_balanced(items):
    for task, (_, choices) in TASKS.items():
        labels = Counter(it["label"] for it in items["train"] if it["task"] == task)
        per_label = COUNTS[task][0] // len(choices)
        assert [labels.get(i, 0) for i in range(len(choices))] == [per_label] * len(choices), task


def test_test_label_counts_as_documented(items):
    for task, (_, choices) in TASKS.items():
        labels = Counter(it["label"] for it in items["test"] if it["task"] == task)
        assert [labels.get(i, 0) for i in range(len(choices))] == TEST_LABELS[task], task


@pytest.mark.parametrize("split", SPLITS)
def test_no_duplicates_within_a_split(items, split):
    questions = [it["question"] for it in items[split]]
    assert len(set(questions)) == len(questions)
    keys = [(it["task"], _text_key(it)) for it in items[split]]
    assert len(set(keys)) == len(keys), "an underlying text occurs twice in one task"


def test_no_test_item_occurs_in_training(items):
    train, test = items["train"], items["test"]
    assert not {it["question"] for it in train} & {it["question"] for it in test}
    # the same underlying text (sentence, or pair in either order), whatever the template
    assert not {_text_key(it) for it in train} & {_text_key(it) for it in test}
    # stricter: no sentence of a test item is in training (SICK reuses sentences by design)
    for task in TASKS:
        if task in SENTENCE_REUSE_ALLOWED:
            continue
        train_sentences = {s for it in train if it["task"] == task for s in _sentences(it)}
        test_sentences = {s for it in test if it["task"] == task for s in _sentences(it)}
        assert not train_sentences & test_sentences, task


def test_wic_word_occurs_in_first_sentence(items):
    for it in items["train"] + items["test"]:
        if it["task"] == "wic":
            m = re.fullmatch(TEMPLATES["wic"], it["question"], flags=re.DOTALL)
            assert m.group("w") in m.group("a").split(" "), it["question"]


def test_files_match_sha256_recorded_in_sources():
    sources = (DATA_DIR / "SOURCES.md").read_text(encoding="utf-8")
    for split in SPLITS:
        name = f"{split}.jsonl"
        recorded = re.search(rf"`{re.escape(name)}`[^\n]*?`([0-9a-f]{{64}})`", sources)
        assert recorded, f"SOURCES.md records no sha256 for {name}"
        actual = hashlib.sha256((DATA_DIR / name).read_bytes()).hexdigest()
        assert actual == recorded.group(1), f"{name} differs from the recorded sha256"
