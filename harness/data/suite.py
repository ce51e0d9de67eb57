"""The generated task suite: short multiple-choice tasks that deliberately conflict.

Every input is a list of four words, one animal, one color, one fruit and one word
from vehicle/clothing/tool, in a random order, rendered as ``Words: red cat apple bus``.
Six instructions read that same line differently:

========  =======================  ==========
task      instruction              family
========  =======================  ==========
first     pick the first word.     position
second    pick the second word.    position
last      pick the last word.      position
animal    pick the animal.         category
color     pick the color.          category
fruit     pick the fruit.          category
========  =======================  ==========

Each word list is generated once and emitted for every task of the suite, so the
same ``Words:`` line has different correct answers under different instructions:
task interference (what mixtures of experts are meant to fix) is really present.
The choices of an item are the same four words in a shuffled order and ``label``
is the index of the correct word among them. Answers are single words, each a
single token for the SmolLM2 tokenizer (with a leading space), so lm-eval's
log-likelihood scoring stays cheap. Use only words from :data:`POOLS`.

Guarantees of :func:`generate_suite`, all for a given seed:

* fully deterministic (private ``random.Random`` streams, never the global RNG);
  the streams are keyed by seed, split and task, so a task's items do not depend
  on which other tasks are selected, and the test lists do not depend on
  ``train_per_task``;
* labels balanced per task per split (the counts of each label differ by <= 1),
  and so is every prefix of a task's items (lm-eval's ``limit`` takes a prefix);
* test word lists are held out: no test list has the same *set* of words as any
  train list (no two lists in the whole suite share a word set).
"""

from __future__ import annotations

import random
from typing import Any, NamedTuple

_POOL_WORDS = {
    "animal": "cat dog horse cow sheep lion tiger bear wolf fox mouse rabbit goat pig duck bird fish frog",
    "color": "red blue green yellow black white pink brown orange purple gray",
    "fruit": "apple banana grape lemon mango peach pear cherry plum",
    "vehicle": "car bus train boat plane bike truck ship",
    "clothing": "shirt hat shoe sock coat dress glove",
    "tool": "hammer saw drill knife spoon fork cup plate",
}
POOLS: dict[str, tuple[str, ...]] = {
    cat: tuple(words.split()) for cat, words in _POOL_WORDS.items()
}
"""Word pools by category (each word belongs to exactly one pool)."""

ANSWER_CATEGORIES: tuple[str, ...] = ("animal", "color", "fruit")
"""Categories that every word list contains exactly once (the category tasks' answers)."""

FILLER_CATEGORIES: tuple[str, ...] = ("vehicle", "clothing", "tool")
"""Categories of the fourth word of a list (one of them, chosen uniformly)."""

WORD_CATEGORY: dict[str, str] = {w: cat for cat, words in POOLS.items() for w in words}
"""word -> its category."""

WORDS_PER_LIST = 4


class TaskSpec(NamedTuple):
    instruction: str
    family: str


TASKS: dict[str, TaskSpec] = {
    "first": TaskSpec("pick the first word.", "position"),
    "second": TaskSpec("pick the second word.", "position"),
    "last": TaskSpec("pick the last word.", "position"),
    "animal": TaskSpec("pick the animal.", "category"),
    "color": TaskSpec("pick the color.", "category"),
    "fruit": TaskSpec("pick the fruit.", "category"),
}
"""Task name -> (instruction, family), in the suite's canonical order."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "position": ("first", "second", "last"),
    "category": ("animal", "color", "fruit"),
}
"""Family name -> its task names."""

_POSITION = {"first": 0, "second": 1, "last": WORDS_PER_LIST - 1}

MAX_WORD_LISTS = (
    len(POOLS["animal"])
    * len(POOLS["color"])
    * len(POOLS["fruit"])
    * sum(len(POOLS[c]) for c in FILLER_CATEGORIES)
)
"""How many distinct word sets exist (train and test lists together cannot exceed it)."""


def render_words(words: list[str] | tuple[str, ...]) -> str:
    """The input line of a word list: ``"Words: red cat apple bus"``."""
    return "Words: " + " ".join(words)


def render_question(task: str, words: list[str] | tuple[str, ...]) -> str:
    """``"Task: <instruction>\\nWords: <w1> <w2> <w3> <w4>"``."""
    return f"Task: {TASKS[_check_task(task)].instruction}\n{render_words(words)}"


def answer_for(task: str, words: list[str] | tuple[str, ...]) -> str:
    """The correct word of ``task`` for a word list (in list order)."""
    spec = TASKS[_check_task(task)]
    if spec.family == "position":
        return words[_POSITION[task]]
    matches = [w for w in words if WORD_CATEGORY.get(w) == task]
    if len(matches) != 1:
        raise ValueError(f"word list {list(words)} has {len(matches)} words of category {task!r}")
    return matches[0]


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} (valid tasks: {', '.join(TASKS)})")
    return task


def _rng(seed: int, *parts: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: stable across runs,
    # platforms and PYTHONHASHSEED, and independent streams for different parts.
    return random.Random(":".join(["moelora-suite", str(seed), *parts]))


def _draw_list(rng: random.Random) -> tuple[str, ...]:
    words = [rng.choice(POOLS[c]) for c in ANSWER_CATEGORIES]
    words.append(rng.choice(POOLS[rng.choice(FILLER_CATEGORIES)]))
    rng.shuffle(words)
    return tuple(words)


def _draw_lists(rng: random.Random, n: int, taken: set[frozenset[str]]) -> list[tuple[str, ...]]:
    """``n`` word lists whose word sets are new (not in ``taken``, which is updated)."""
    lists: list[tuple[str, ...]] = []
    while len(lists) < n:
        words = _draw_list(rng)
        key = frozenset(words)
        if key in taken:
            continue
        taken.add(key)
        lists.append(words)
    return lists


def _items_for_task(
    seed: int, split: str, task: str, lists: list[tuple[str, ...]]
) -> list[dict[str, Any]]:
    rng = _rng(seed, split, task, "choices")
    # Labels in shuffled blocks of 0..3: every prefix of the task (what lm-eval's
    # ``limit`` evaluates) is balanced too, the counts of each label within 1.
    labels: list[int] = []
    while len(labels) < len(lists):
        block = list(range(WORDS_PER_LIST))
        rng.shuffle(block)
        labels += block
    items = []
    for words, label in zip(lists, labels):
        answer = answer_for(task, words)
        others = [w for w in words if w != answer]
        rng.shuffle(others)
        choices = [*others[:label], answer, *others[label:]]
        items.append(
            {
                "question": render_question(task, words),
                "choices": choices,
                "label": label,
                "task": task,
                "family": TASKS[task].family,
            }
        )
    return items


def resolve_tasks(tasks: list[str] | None) -> list[str]:
    """The task list to generate: all of :data:`TASKS` for ``None``, else the given
    names in the given order (duplicates dropped). Unknown names raise ValueError."""
    if tasks is None:
        return list(TASKS)
    if isinstance(tasks, str) or not list(tasks):
        raise ValueError(
            f"tasks must be a non-empty list of task names (valid tasks: {', '.join(TASKS)}), "
            f"got {tasks!r}"
        )
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(
            f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
            f"(valid tasks: {', '.join(TASKS)})"
        )
    return list(dict.fromkeys(tasks))


def generate_suite(
    seed: int = 1234,
    tasks: list[str] | None = None,
    train_per_task: int = 256,
    test_per_task: int = 100,
) -> dict[str, list[dict[str, Any]]]:
    """The suite's items: ``{"train": [...], "test": [...]}``.

    Each split has ``n_per_task`` word lists, each emitted once for every task, so a
    split holds ``n_per_task * len(tasks)`` items, ordered task by task (in the
    order of ``tasks``), and within a task in word-list order. Items are
    ``{"question", "choices", "label", "task", "family"}``.
    """
    for name, value, minimum in (
        ("seed", seed, None),
        ("train_per_task", train_per_task, 0),
        ("test_per_task", test_per_task, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    names = resolve_tasks(tasks)
    if train_per_task + test_per_task > MAX_WORD_LISTS:
        raise ValueError(
            f"train_per_task + test_per_task = {train_per_task + test_per_task} exceeds the "
            f"{MAX_WORD_LISTS} distinct word sets the pools allow"
        )
    taken: set[frozenset[str]] = set()
    # Test lists first, from their own stream: they depend on (seed, test_per_task) only.
    test_lists = _draw_lists(_rng(seed, "test", "lists"), test_per_task, taken)
    train_lists = _draw_lists(_rng(seed, "train", "lists"), train_per_task, taken)
    return {
        "train": [it for t in names for it in _items_for_task(seed, "train", t, train_lists)],
        "test": [it for t in names for it in _items_for_task(seed, "test", t, test_lists)],
    }
