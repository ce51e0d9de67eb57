"""The generated task suite: short multiple-choice tasks that deliberately conflict.

Every input is a list of four words from four different categories, in a random order,
rendered as ``Words: red cat hammer bus``. Each task asks for the word of one category:

=========  =======================  ==========
task       instruction              family
=========  =======================  ==========
animal     pick the animal.         nature
color      pick the color.          nature
fruit      pick the fruit.          nature
vehicle    pick the vehicle.        artifact
clothing   pick the clothing.       artifact
tool       pick the tool.           artifact
=========  =======================  ==========

Each word list is emitted once for every task whose category it holds (four of the six),
so the same ``Words:`` line has different correct answers under different instructions:
task interference (what mixtures of experts are meant to fix) is really present, within a
family and across families. The choices of an item are the list's four words in a
shuffled order and ``label`` is the index of the correct one. Every word is a single
token for the SmolLM2 tokenizer (with a leading space), so lm-eval's log-likelihood
scoring stays cheap.

Why these tasks (README, "the default study"): every one is learnable within the study's
budget (the category of a word is in the frozen model's features; the adapters learn to
pick by the instruction), while an earlier suite's position tasks ("second word", "last
word") stayed below chance for every method and the base model, so a third of that
suite measured only noise.

Guarantees of :func:`generate_suite`, all for a given seed:

* fully deterministic (private ``random.Random`` streams, never the global RNG); the
  streams are keyed by seed and split, a task's items do not depend on which other
  tasks are selected, and the test lists do not depend on ``train_per_task``;
* **no test word in training**: each category's words are split once (every third word
  of the sorted pool is held out for the test split), so a test item can only be
  answered by the task, not by a memorised word;
* labels balanced per task per split (the counts of each label differ by <= 1), and so
  is every prefix of a task's items (lm-eval's ``limit`` takes a prefix);
* every task has exactly ``n_per_task`` items per split, and the categories of the lists
  are balanced (every 4-of-6 category set in turn).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping
from typing import Any, NamedTuple

_POOL_WORDS = {
    "animal": "cat dog horse cow sheep lion tiger bear wolf fox mouse rabbit goat pig duck bird fish frog deer snake owl",
    "color": "red blue green yellow black white pink brown orange purple gray",
    "fruit": "apple banana grape lemon mango peach pear cherry plum lime",
    "vehicle": "car bus train boat plane bike truck ship taxi van",
    "clothing": "shirt hat shoe sock coat dress glove skirt jacket belt",
    "tool": "hammer saw drill wrench axe knife shovel rake screw nail",
}
POOLS: dict[str, tuple[str, ...]] = {cat: tuple(words.split()) for cat, words in _POOL_WORDS.items()}
"""Word pools by category (each word belongs to exactly one pool)."""

WORD_CATEGORY: dict[str, str] = {w: cat for cat, words in POOLS.items() for w in words}
"""word -> its category."""

WORDS_PER_LIST = 4


class TaskSpec(NamedTuple):
    instruction: str
    family: str


TASKS: dict[str, TaskSpec] = {
    "animal": TaskSpec("pick the animal.", "nature"),
    "color": TaskSpec("pick the color.", "nature"),
    "fruit": TaskSpec("pick the fruit.", "nature"),
    "vehicle": TaskSpec("pick the vehicle.", "artifact"),
    "clothing": TaskSpec("pick the clothing.", "artifact"),
    "tool": TaskSpec("pick the tool.", "artifact"),
}
"""Task name -> (instruction, family), in the suite's canonical order."""

FAMILIES: dict[str, tuple[str, ...]] = {
    "nature": ("animal", "color", "fruit"),
    "artifact": ("vehicle", "clothing", "tool"),
}
"""Family name -> its task names."""

CATEGORY_SETS: tuple[tuple[str, ...], ...] = tuple(itertools.combinations(TASKS, WORDS_PER_LIST))
"""Every set of four categories a word list can hold (15), cycled in turn."""


def split_words(category: str) -> dict[str, tuple[str, ...]]:
    """``{"train": ..., "test": ...}`` words of a category: every third word of the sorted
    pool is held out for the test split."""
    words = sorted(POOLS[category])
    return {
        "train": tuple(w for i, w in enumerate(words) if i % 3 != 2),
        "test": tuple(w for i, w in enumerate(words) if i % 3 == 2),
    }


def render_words(words: list[str] | tuple[str, ...]) -> str:
    """The input line of a word list: ``"Words: red cat hammer bus"``."""
    return "Words: " + " ".join(words)


def render_question(task: str, words: list[str] | tuple[str, ...]) -> str:
    """``"Task: <instruction>\\nWords: <w1> <w2> <w3> <w4>"``."""
    return f"Task: {TASKS[_check_task(task)].instruction}\n{render_words(words)}"


def answer_for(task: str, words: list[str] | tuple[str, ...]) -> str:
    """The word of ``task``'s category in a word list."""
    _check_task(task)
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
    return random.Random(":".join(["moelora-suite-v2", str(seed), *parts]))


def _draw_lists(rng: random.Random, split: str, n_per_task: int, tasks: list[str],
                taken: set[frozenset[str]]) -> list[tuple[str, ...]]:
    """Word lists, cycling through the category sets in a shuffled order, until every task
    of ``tasks`` has ``n_per_task`` lists holding its category (word sets never repeat)."""
    pools = {cat: split_words(cat)[split] for cat in TASKS}
    order = list(CATEGORY_SETS)
    rng.shuffle(order)
    have = dict.fromkeys(tasks, 0)
    lists: list[tuple[str, ...]] = []
    attempts = 0
    while min(have.values()) < n_per_task:
        categories = order[len(lists) % len(order)] if attempts < 50 else order[rng.randrange(len(order))]
        words = [rng.choice(pools[c]) for c in categories]
        rng.shuffle(words)
        key = frozenset(words)
        if key in taken:
            attempts += 1
            if attempts > 10_000:
                raise ValueError(f"not enough distinct {split} word lists for {n_per_task} items per task")
            continue
        attempts = 0
        taken.add(key)
        lists.append(tuple(words))
        for c in categories:
            if c in have:
                have[c] += 1
    return lists


def _items_for_task(seed: int, split: str, task: str, lists: list[tuple[str, ...]],
                    n_per_task: int) -> list[dict[str, Any]]:
    rng = _rng(seed, split, task, "choices")
    chosen = [w for w in lists if any(WORD_CATEGORY[x] == task for x in w)][:n_per_task]
    # Labels in shuffled blocks of 0..3: every prefix of the task (what lm-eval's
    # ``limit`` evaluates) is balanced too, the counts of each label within 1.
    labels: list[int] = []
    while len(labels) < len(chosen):
        block = list(range(WORDS_PER_LIST))
        rng.shuffle(block)
        labels += block
    items = []
    for words, label in zip(chosen, labels):
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
    """The suite's items: ``{"train": [...], "test": [...]}``, each split ``n_per_task``
    items per task, ordered task by task (in the order of ``tasks``), within a task in
    word-list order. Items are ``{"question", "choices", "label", "task", "family"}``."""
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
    taken: set[frozenset[str]] = set()
    # Each split from its own stream (and its own words): test lists depend on
    # (seed, test_per_task, tasks) only.
    # Lists for every task of the suite, whatever the selection: a task's items do not
    # depend on which other tasks are selected.
    test_lists = _draw_lists(_rng(seed, "test", "lists"), "test", test_per_task, list(TASKS), taken)
    train_lists = _draw_lists(_rng(seed, "train", "lists"), "train", train_per_task, list(TASKS), taken)
    return {
        "train": [it for t in names for it in _items_for_task(seed, "train", t, train_lists, train_per_task)],
        "test": [it for t in names for it in _items_for_task(seed, "test", t, test_lists, test_per_task)],
    }


def suite_from_config(data_cfg: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The suite a ``data: {source: generated}`` config section describes (``seed``,
    ``tasks``, ``train_per_task``, ``test_per_task``; unset keys: :func:`generate_suite`'s
    defaults)."""
    keys = ("seed", "tasks", "train_per_task", "test_per_task")
    return generate_suite(**{k: data_cfg[k] for k in keys if data_cfg.get(k) is not None})
