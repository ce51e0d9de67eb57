"""Loads one task's docs for lm-eval (written by harness.data.lm_eval_tasks; do not edit).

The task YAMLs next to this file say ``custom_dataset: !function suite_data.load``
and ``dataset_kwargs: {file: data/<task>.jsonl}``; the file is resolved relative to
this folder, so the folder can be moved or copied as a whole.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(file=None, **kwargs):
    """``datasets.DatasetDict({"test": ...})`` of a JSONL file, built in memory (no cache
    to go stale, no builder set-up per task); other kwargs (lm-eval passes the task
    metadata and any model args) are ignored. The data step validated every line."""
    import datasets

    if not file:
        raise ValueError("suite_data.load needs dataset_kwargs: {file: data/<task>.jsonl}")
    path = Path(file)
    if not path.is_absolute():
        path = HERE / path
    if not path.is_file():
        raise FileNotFoundError(f"suite_data.load: no data file {path}")
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    test = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict({"test": test})


def load_general_text(file=None, **kwargs):
    """The general-text documents as lm-eval's wikitext task reads them: ``page`` holds a
    document's text (the file's ``text`` field)."""
    import datasets

    path = HERE / file
    with open(path, encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle if line.strip()]
    pages = [{"page": row["text"], "title": row.get("page") or row.get("title") or ""} for row in rows]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(pages)})


def detokenize(doc):
    """lm-eval's own WikiText detokenizer (its wikitext task's ``doc_to_target``)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import wikitext_detokenizer

    return wikitext_detokenizer(doc)


def process_general_text(doc, results):
    """lm-eval's own word and byte counts (its wikitext task's ``process_results``)."""
    from lm_eval.tasks.wikitext.preprocess_wikitext import process_results

    return process_results(doc, results)
