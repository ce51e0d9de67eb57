"""Generation tasks: items whose answer is a string, trained on the answer's tokens and scored
by lm-eval ``generate_until`` with its built-in ``exact_match``.

A generation item is ``{"question": str, "answer": str, "task": str, ...}`` (no ``choices``).
Training sees ``build_prompt(item)`` as the context and ``" " + answer + "\\n"`` as the
continuation (:func:`harness.data.prompts.training_texts`): the loss covers the answer's
tokens and the newline that ends it, which is the ``until`` string lm-eval stops generating
at. lm-eval scores the greedy continuation of the same context, cut at the newline, with
``exact_match`` after stripping leading and trailing whitespace (``regexes_to_ignore``).

:func:`generation_task_files` writes a task the way the multiple-choice tasks are written: its
docs loaded by the installed harness's ``load_docs`` from the task's JSONL file next to the
YAML, Jinja templates, lm-eval's built-in metric; nothing in the task folder is executed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from harness.data.prompts import GENERATION_UNTIL, LM_EVAL_DOC_TO_TEXT, TARGET_DELIMITER

#: the lm-eval metric a generation task is scored with (per item: 1 when the stripped
#: generation equals the answer)
GENERATION_METRIC = "exact_match"
#: leading/trailing whitespace is not part of the answer (the model's text starts with the
#: target delimiter's space)
IGNORE = ("^\\s+", "\\s+$")


def is_generation(item: Mapping[str, Any]) -> bool:
    """Whether an item is a generation item (an ``answer``, no ``choices``)."""
    return "choices" not in item and "answer" in item


def validate_generation_item(obj: Any) -> None:
    """Raise ``ValueError`` (message without location) when ``obj`` is not a valid generation
    item: a non-empty string ``question``, a non-empty one-line string ``answer``, an optional
    non-empty string ``task``."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected an object with fields question, answer, got {type(obj).__name__}")
    for field in ("question", "answer"):
        value = obj.get(field)
        if not isinstance(value, str) or not value.strip():
            got = "missing" if field not in obj else ("an empty string" if isinstance(value, str) else
                                                       "null" if value is None else type(value).__name__)
            raise ValueError(f"{field} of a generation item must be a non-empty string, got {got}")
    if GENERATION_UNTIL in obj["answer"]:
        raise ValueError(
            f"answer {obj['answer']!r} holds {GENERATION_UNTIL!r}, where generation stops "
            "(until); write the answer on one line"
        )
    if "task" in obj and (not isinstance(obj["task"], str) or not obj["task"].strip()):
        raise ValueError(f"task must be a non-empty string when given, got {obj['task']!r}")


def max_gen_toks(items: Sequence[dict[str, Any]]) -> int:
    """Enough new tokens for the longest answer with its delimiter and stop string: its UTF-8
    bytes (a byte-level tokenizer's token covers at least one byte), so a right answer is never
    cut short; generation stops at the newline before that."""
    return max(len((TARGET_DELIMITER + it["answer"] + GENERATION_UNTIL).encode("utf-8")) for it in items)


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def generation_task_yaml(name: str, alias: str, data_file: str, items: Sequence[dict[str, Any]]) -> str:
    """The YAML text of one ``generate_until`` task named ``name`` over the JSONL ``data_file``
    (relative to the YAML's folder). Its docs are loaded by the installed harness's
    ``load_docs`` (as the multiple-choice tasks are: no code and no working-directory-relative
    path in the task folder, so the folder can be moved and shared)."""
    return (
        "# Written by harness.data.generation (do not edit: the data step rewrites it).\n"
        f"task: {name}\n"
        f"task_alias: {alias}\n"
        "custom_dataset: !function harness.data.lm_eval_tasks.load_docs\n"
        "dataset_kwargs:\n"
        f"  file: {data_file}\n"
        "output_type: generate_until\n"
        "test_split: test\n"
        f"doc_to_text: {_q(LM_EVAL_DOC_TO_TEXT)}\n"
        'doc_to_target: "{{answer}}"\n'
        f"target_delimiter: {_q(TARGET_DELIMITER)}\n"
        "generation_kwargs:\n"
        f"  until: [{_q(GENERATION_UNTIL)}]\n"
        f"  max_gen_toks: {max_gen_toks(items)}\n"
        "  do_sample: false\n"
        "metric_list:\n"
        f"  - metric: {GENERATION_METRIC}\n"
        "    aggregation: mean\n"
        "    higher_is_better: true\n"
        f"    regexes_to_ignore: [{', '.join(_q(r) for r in IGNORE)}]\n"
        "metadata:\n"
        "  version: 1.0\n"
    )


def generation_task_files(
    task: str, name: str, folder: Path, items: Sequence[dict[str, Any]]
) -> dict[str, str]:
    """``{path relative to folder: text}`` of one generation task: its YAML and its docs
    (``data/{task}.jsonl``: question, answer, task, then the items' other fields)."""
    for i, item in enumerate(items):
        try:
            validate_generation_item(item)
        except ValueError as e:
            raise ValueError(f"test item {i} of task {task!r}: {e}") from None
    rel = f"data/{task}.jsonl"
    docs = "".join(
        json.dumps({"question": it["question"], "answer": it["answer"], "task": it["task"],
                    **{k: v for k, v in it.items() if k not in ("question", "answer", "task")}},
                   ensure_ascii=False) + "\n"
        for it in items
    )
    return {f"{name}.yaml": generation_task_yaml(name, task, rel, items), rel: docs}
