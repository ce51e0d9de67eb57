"""Data hygiene: repeated items, repeated ids and training items that are test items.

Two items are *the same item* when their question and their choices (in order; none for
a generation item) are equal after collapsing runs of whitespace; the task and the answer
(``label``, or a generation item's ``answer``) do not count, so a question filed under two
tasks, or given two answers, is still one question. ``id`` fields (when a
line has one) are compared as JSON values within one file.

What :func:`data_hygiene` refuses and what it only reports, and why:

* **test file, the same item twice: refused.** Each copy is scored, so the item weighs
  twice in the task's accuracy and in the per-item paired comparisons between methods;
  with different labels one of the copies is scored wrong whatever the model answers.
* **any file, an ``id`` twice: refused.** An id names one item; two items under one id
  make every per-item record keyed by it ambiguous.
* **training file, the same item twice with different answers: refused** (the model is
  taught two answers to one question).
* **training file, the same item twice with the same answer: a warning.** Repeating an
  item is a legitimate way to weigh it more; it is named so that an accident is seen.
* **a training item that is also a test item: refused**, unless the config declares the
  overlap intended (``data.allow_overlap: true``, e.g. a memorisation study); then a
  warning. A test item the model was trained on measures recall, not the skill.

Every finding names the file and line (or generated item number) of both items.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

#: findings of one kind shown in full; the rest are counted
SHOWN = 5


def item_key(item: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """What makes two items the same item: question and choices, whitespace collapsed."""
    choices = item.get("choices") or ()
    return " ".join(item["question"].split()), tuple(" ".join(c.split()) for c in choices)


def _answer(item: dict[str, Any]) -> Any:
    """The correct answer: a choice's index, or a generation item's answer text."""
    return item["label"] if "label" in item else item.get("answer")


@dataclass
class Hygiene:
    """The findings: ``errors`` refuse the study, ``warnings`` are reported."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _listed(pairs: list[str], what: str) -> str:
    shown = "; ".join(pairs[:SHOWN])
    more = f"; and {len(pairs) - SHOWN} more" if len(pairs) > SHOWN else ""
    return f"{len(pairs)} {what}: {shown}{more}"


def _repeats(items: list[tuple[str, dict[str, Any]]]) -> tuple[list[str], list[str], list[str]]:
    """``(same item same label, same item other label, same id)`` as ``"B repeats A ..."``."""
    first: dict[Any, tuple[str, dict[str, Any]]] = {}
    first_id: dict[str, str] = {}
    same, conflicting, ids = [], [], []
    for where, item in items:
        key = item_key(item)
        if key in first:
            where0, item0 = first[key]
            if _answer(item0) == _answer(item):
                same.append(f"{where} repeats {where0}")
            else:
                conflicting.append(
                    f"{where} repeats {where0} with answer {_answer(item)!r} instead of {_answer(item0)!r}"
                )
        else:
            first[key] = (where, item)
        if "id" in item:
            ident = json.dumps(item["id"], sort_keys=True, ensure_ascii=False)
            if ident in first_id:
                ids.append(f"{where} repeats id {ident} of {first_id[ident]}")
            else:
                first_id[ident] = where
    return same, conflicting, ids


def data_hygiene(
    train: list[tuple[str, dict[str, Any]]],
    test: list[tuple[str, dict[str, Any]]],
    allow_overlap: bool = False,
) -> Hygiene:
    """The findings over ``(where, item)`` lists of the training and test items (the rules
    in this module's docstring); nothing found: an empty :class:`Hygiene`."""
    out = Hygiene()
    same, conflicting, ids = _repeats(test)
    if same or conflicting:
        out.errors.append(
            _listed(same + conflicting, "repeated test item(s) (same question and choices)")
            + "; each copy would be scored, weighing the item twice: keep one line of each"
        )
    if ids:
        out.errors.append(_listed(ids, "repeated test id(s)") + "; give every item its own id")
    same, conflicting, ids = _repeats(train)
    if conflicting:
        out.errors.append(
            _listed(conflicting, "training item(s) repeated with another answer")
            + "; the model would be taught two answers: keep the line with the right one"
        )
    if ids:
        out.errors.append(_listed(ids, "repeated training id(s)") + "; give every item its own id")
    if same:
        out.warnings.append(
            _listed(same, "repeated training item(s) (same question, choices and answer)")
            + "; each copy is trained on, so the item weighs more (remove the copies unless intended)"
        )
    in_test: dict[Any, str] = {}
    for where, item in test:
        in_test.setdefault(item_key(item), where)
    overlap = [
        f"{where} is test item {in_test[item_key(item)]}"
        for where, item in train
        if item_key(item) in in_test
    ]
    if overlap:
        text = _listed(overlap, "training item(s) that are also test items (same question and choices)")
        if allow_overlap:
            out.warnings.append(text + " (data.allow_overlap: true declares this intended)")
        else:
            out.errors.append(
                text + "; a test item seen in training measures recall, not the skill: remove "
                "them from the training file, or set data.allow_overlap: true if the overlap "
                "is intended"
            )
    return out
