"""Data for the harness: the generated task suite, local and ``datasets`` sources, prompts, lm-eval task folders.

* :mod:`harness.data.suite`: the deterministic, deliberately conflicting task suite;
* :mod:`harness.data.prompts`: the one place prompt text is built;
* :mod:`harness.data.jsonl`: load and validate local multiple-choice JSONL files;
* :mod:`harness.data.sources`: JSONL, CSV, parquet, ``save_to_disk`` and ``datasets`` sources
  with a field mapping, into multiple-choice or generation items;
* :mod:`harness.data.generation`: generation items and their lm-eval ``generate_until`` tasks;
* :mod:`harness.data.lm_eval_tasks`: write an lm-eval task folder for test items;
* :mod:`harness.data.prepare`: the data step, orchestrating the above.
"""

from harness.data.jsonl import DataError, load_jsonl, write_jsonl
from harness.data.lm_eval_tasks import write_task_folder
from harness.data.prepare import prepare_data
from harness.data.prompts import PROMPT_TEMPLATE, TARGET_DELIMITER, build_prompt, continuation
from harness.data.suite import FAMILIES, POOLS, TASKS, generate_suite

__all__ = [
    "FAMILIES",
    "POOLS",
    "PROMPT_TEMPLATE",
    "TARGET_DELIMITER",
    "TASKS",
    "DataError",
    "build_prompt",
    "continuation",
    "generate_suite",
    "load_jsonl",
    "prepare_data",
    "write_jsonl",
    "write_task_folder",
]
