"""Loads one task's docs for lm-eval (written by harness.data.lm_eval_tasks; do not edit).

The task YAMLs next to this file say ``custom_dataset: !function suite_data.load``
and ``dataset_kwargs: {file: data/<task>.jsonl}``; the file is resolved relative to
this folder, so the folder can be moved or copied as a whole.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def load(file=None, **kwargs):
    """``datasets.DatasetDict({"test": ...})`` of a JSONL file; other kwargs (lm-eval
    passes the task metadata and any model args) are ignored."""
    import datasets

    if not file:
        raise ValueError("suite_data.load needs dataset_kwargs: {file: data/<task>.jsonl}")
    path = Path(file)
    if not path.is_absolute():
        path = HERE / path
    if not path.is_file():
        raise FileNotFoundError(f"suite_data.load: no data file {path}")
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        # A private temporary cache: a rewritten file is never served from a stale cache.
        with tempfile.TemporaryDirectory(prefix="suite-data-") as cache:
            test = datasets.load_dataset(
                "json", data_files=str(path), split="train", cache_dir=cache, keep_in_memory=True
            )
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
    return datasets.DatasetDict({"test": test})
