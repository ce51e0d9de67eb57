"""Tokenising (context, continuation) pairs exactly as lm-eval's ``TemplateLM._encode_pair``.

Training and evaluation use this one function, so the answer token the loss
trains is the token lm-eval scores. Trailing spaces of the context move to the
continuation; the continuation's ids are the tail of the whole string's ids.
No special tokens are added (lm-eval's default for causal models without BOS).
"""

from __future__ import annotations


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    if not context:
        raise ValueError("context must not be empty")
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    return context_ids, whole[len(context_ids) :]
