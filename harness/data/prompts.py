"""The one place prompt text is built, for training and for lm-eval alike.

lm-eval scores a multiple-choice item by the log-likelihood of each continuation
``target_delimiter + choice`` after the context ``doc_to_text(doc)``. Training uses
:func:`build_prompt` and :func:`continuation`, and the task YAMLs written by
:mod:`harness.data.lm_eval_tasks` use :data:`LM_EVAL_DOC_TO_TEXT` and
:data:`TARGET_DELIMITER`, so both see exactly the same strings (a test checks this
against lm-eval's own requests). This holds for zero-shot scoring without a chat
template: with ``apply_chat_template`` lm-eval drops the target delimiter.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

PROMPT_TEMPLATE = "{question}\nAnswer:"
"""The context of an item (``str.format`` template)."""

TARGET_DELIMITER = " "
"""Put between the context and each answer choice."""

LM_EVAL_DOC_TO_TEXT = "{{question}}\nAnswer:"
""":data:`PROMPT_TEMPLATE` as lm-eval's ``doc_to_text`` (a Jinja template)."""

GENERATION_UNTIL = "\n"
"""Where a generation task's answer ends: trained after the answer, and lm-eval's ``until``."""


def build_prompt(item_or_question: Mapping[str, Any] | str) -> str:
    """The context for an item (a dict with ``question``) or for a question string."""
    if isinstance(item_or_question, str):
        question = item_or_question
    elif isinstance(item_or_question, Mapping) and "question" in item_or_question:
        question = item_or_question["question"]
    else:
        raise TypeError(
            f"build_prompt expects a question string or an item with a 'question' field, "
            f"got {type(item_or_question).__name__}"
        )
    return PROMPT_TEMPLATE.format(question=question)


def continuation(choice: str) -> str:
    """What is scored after the prompt for one answer choice: ``" " + choice``."""
    return TARGET_DELIMITER + choice


def training_texts(item: Mapping[str, Any]) -> tuple[str, str]:
    """``(context, continuation)`` of an item's correct answer, as training sees them.

    Items rendered from lm-eval tasks (:mod:`harness.data.lm_eval_train`) carry the exact
    strings lm-eval scores (``context``, ``continuation``: the task's own prompt and
    target delimiter); every other item is rendered with :func:`build_prompt` and
    :func:`continuation`. A generation item (a string ``answer``, no ``choices``) continues
    with its answer and :data:`GENERATION_UNTIL`, the string lm-eval stops generating at.
    """
    if "context" in item and "continuation" in item:
        return item["context"], item["continuation"]
    if "choices" not in item and "answer" in item:
        return build_prompt(item), continuation(item["answer"]) + GENERATION_UNTIL
    return build_prompt(item), continuation(item["choices"][item["label"]])
