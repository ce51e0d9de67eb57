"""Tokenising (context, continuation) pairs exactly as lm-eval's ``TemplateLM._encode_pair``.

Training and evaluation use this one function, so the answer token the loss
trains is the token lm-eval scores. Trailing spaces of the context move to the
continuation; the continuation's ids are the tail of the whole string's ids.
No special tokens are added (lm-eval's default for causal models without BOS).
"""

from __future__ import annotations

#: the longest sequence the harness's lm-eval model scores (``HarnessLM``'s ``max_length``
#: unless given): lm-eval cuts a longer (context + continuation) from the left
SCORING_WINDOW = 2048


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _move_trailing_spaces(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's split: the context's trailing whitespace belongs to the continuation."""
    if not context:
        raise ValueError("context must not be empty")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        return context[:-n_spaces], context[-n_spaces:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    context, continuation = _move_trailing_spaces(context, continuation)
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]


def encode_pairs(tokenizer, pairs: list[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """:func:`encode_pair` of many pairs in two batched tokenizer calls: the same ids, faster
    (the lengths check tokenises every training and test item)."""
    split = [_move_trailing_spaces(context, continuation) for context, continuation in pairs]
    if not split:
        return []
    contexts = list(dict.fromkeys(c for c, _ in split))
    context_ids = dict(zip(contexts, tokenizer(contexts, add_special_tokens=False)["input_ids"]))
    wholes = tokenizer([c + k for c, k in split], add_special_tokens=False)["input_ids"]
    return [(context_ids[c], whole[len(context_ids[c]):]) for (c, _), whole in zip(split, wholes)]
