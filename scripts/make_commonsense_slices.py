#!/usr/bin/env python3
"""Make the small commonsense slices in ``data/commonsense/`` from the raw source files.

Provenance only: this script is not run by CI or by the workflow, downloads
nothing and uses only the Python standard library. Give it the paths of the raw
files (where they came from is written down in ``data/commonsense/SOURCES.md``)::

    python scripts/make_commonsense_slices.py \\
        --arc-easy-train ARC-Easy-Train.jsonl --arc-easy-dev ARC-Easy-Dev.jsonl \\
        --arc-challenge-train ARC-Challenge-Train.jsonl \\
        --arc-challenge-dev ARC-Challenge-Dev.jsonl \\
        --openbookqa-train Data/Main/train.jsonl --openbookqa-dev Data/Main/dev.jsonl \\
        --commonsense-qa-train train_rand_split.jsonl \\
        --commonsense-qa-dev dev_rand_split.jsonl \\
        --csqa2-train CSQA2_train.json.gz --csqa2-dev CSQA2_dev.json.gz \\
        --winogrande-train train_l.jsonl --winogrande-train-labels train_l-labels.lst \\
        --winogrande-dev dev.jsonl --winogrande-dev-labels dev-labels.lst \\
        --out-dir data/commonsense

For every task the official training split gives the training slice and the
official validation ("dev") split gives the test slice. Each item is rendered in
the harness's format ``{"question", "choices", "label", "task"}`` (the harness
prompts with ``question + "\\nAnswer:"`` and scores ``" " + choice``); items whose
prompt is longer than ``--max-prompt-chars`` are dropped, and so are items whose
answer options are not all different (ambiguous); duplicates within a split
(same question and choices) are dropped; training items that share their question
text with any test item are dropped; then ``--n-train`` / ``--n-test`` items are
drawn with :class:`random.Random` seeded by ``"{seed}:{task}:{split}"`` (the draw
order is the order in the file). The output files hold the tasks in
:data:`TASK_ORDER`, one after the other. A summary (counts, filters, label
distributions, prompt lengths, sha256 of inputs and outputs) goes to stdout.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import random
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

SEED = 20240917
N_TRAIN = 300
N_TEST = 200
MAX_PROMPT_CHARS = 600
PROMPT_SUFFIX = "\nAnswer:"  # what the harness appends to ``question`` (harness.data.prompts)

TASK_ORDER = ("arc_easy", "arc_challenge", "openbookqa", "commonsense_qa", "csqa2", "winogrande")

WINOGRANDE_QUESTION = 'Question: What does the blank "_" refer to?'
CSQA2_STATEMENT_QUESTION = "Question: Is this statement true?"
CSQA_LETTERS = ("A", "B", "C", "D", "E")


# ----------------------------------------------------------------------------- reading


def _read_lines(path: Path) -> list[str]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [line for line in (raw.rstrip("\n").rstrip("\r") for raw in f) if line.strip()]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in _read_lines(path)]


def read_labels(path: Path) -> list[str]:
    return [line.strip() for line in _read_lines(path)]


# ----------------------------------------------------------------------------- rendering


class RepeatedOptions(ValueError):
    """An item whose answer options are not all different (dropped: ambiguous)."""


def _check_distinct(task: str, options: list[str]) -> None:
    stripped = [o.strip() for o in options]
    if len(set(stripped)) != len(stripped):
        raise RepeatedOptions(f"{task}: repeated options {options!r}")


def _item(task: str, question: str, choices: list[str], label: int) -> dict:
    question = question.strip()
    choices = [c.strip() for c in choices]
    _check_distinct(task, choices)
    if not question or len(choices) < 2 or not all(choices) or not 0 <= label < len(choices):
        raise ValueError(f"{task}: cannot render {question!r} / {choices!r} / {label!r}")
    return {"question": question, "choices": choices, "label": label, "task": task}


def render_arc(doc: dict, task: str) -> dict:
    """lm-eval ``arc_easy``/``arc_challenge``: ``Question: {question}`` + choice texts."""
    labels = [c["label"] for c in doc["question"]["choices"]]
    texts = [c["text"] for c in doc["question"]["choices"]]
    return _item(
        task,
        f"Question: {doc['question']['stem'].strip()}",
        texts,
        labels.index(doc["answerKey"].strip()),
    )


def render_openbookqa(doc: dict) -> dict:
    """lm-eval ``openbookqa`` (main): the question stem + choice texts."""
    labels = [c["label"] for c in doc["question"]["choices"]]
    texts = [c["text"] for c in doc["question"]["choices"]]
    return _item(
        "openbookqa", doc["question"]["stem"], texts, labels.index(doc["answerKey"].strip())
    )


def render_commonsense_qa(doc: dict) -> dict:
    """lm-eval ``commonsense_qa``: question with the five lettered options; choices A-E."""
    options = doc["question"]["choices"]
    labels = [c["label"] for c in options]
    if tuple(labels) != CSQA_LETTERS:
        raise ValueError(f"commonsense_qa: unexpected option labels {labels} in {doc['id']}")
    _check_distinct("commonsense_qa", [c["text"] for c in options])
    lines = [f"Question: {doc['question']['stem'].strip()}"]
    lines += [f"{c['label']}. {c['text'].strip()}" for c in options]
    return _item(
        "commonsense_qa",
        "\n".join(lines),
        list(CSQA_LETTERS),
        labels.index(doc["answerKey"].strip()),
    )


def render_csqa2(doc: dict) -> dict:
    """CommonsenseQA 2.0 (no lm-eval task): yes/no like lm-eval ``boolq`` without a passage.

    A question (ends with ``?``) becomes ``Question: {question}``; an assertion (the
    data set's own convention: yes = true, no = false) becomes
    ``{assertion}\\nQuestion: Is this statement true?``. Choices ``["no", "yes"]``.
    """
    text = doc["question"].strip()
    question = f"Question: {text}" if text.endswith("?") else f"{text}\n{CSQA2_STATEMENT_QUESTION}"
    answer = doc["answer"].strip().lower()
    if answer not in ("no", "yes"):
        raise ValueError(f"csqa2: answer {doc['answer']!r} in {doc['id']}")
    return _item("csqa2", question, ["no", "yes"], 1 if answer == "yes" else 0)


def render_winogrande(doc: dict) -> dict:
    """WinoGrande as a question whose choices are the two option words.

    (lm-eval's ``winogrande`` scores the sentence continuation after the blank under
    two different contexts, which one question with fixed choices cannot express.)
    """
    if doc["sentence"].count("_") != 1:
        raise ValueError(f"winogrande: {doc['qID']} has not exactly one blank")
    return _item(
        "winogrande",
        f"{doc['sentence'].strip()}\n{WINOGRANDE_QUESTION}",
        [doc["option1"], doc["option2"]],
        int(doc["answer"]) - 1,
    )


# ----------------------------------------------------------------------------- slicing


def prompt_length(item: dict) -> int:
    return len(item["question"]) + len(PROMPT_SUFFIX)


def key(item: dict) -> tuple[str, tuple[str, ...]]:
    return item["question"], tuple(item["choices"])


def _dedupe(items: list[dict]) -> tuple[list[dict], int]:
    """Keep the first of items with the same question and choices; return (kept, dropped)."""
    seen: set = set()
    out = []
    for it in items:
        if key(it) not in seen:
            seen.add(key(it))
            out.append(it)
    return out, len(items) - len(out)


def slice_task(
    task: str,
    train_docs: list[dict],
    dev_docs: list[dict],
    render: Callable[[dict], dict],
    args: argparse.Namespace,
) -> tuple[list, list, dict]:
    stats: dict = {"source_train": len(train_docs), "source_dev": len(dev_docs)}
    pools = {}
    for split, docs in (("train", train_docs), ("test", dev_docs)):
        items = []
        for d in docs:
            try:
                items.append(render(d))
            except RepeatedOptions:
                stats[f"{split}_repeated_options"] = stats.get(f"{split}_repeated_options", 0) + 1
        stats.setdefault(f"{split}_repeated_options", 0)
        kept = [it for it in items if prompt_length(it) <= args.max_prompt_chars]
        stats[f"{split}_over_length_cap"] = len(items) - len(kept)
        kept, dup = _dedupe(kept)
        stats[f"{split}_duplicates"] = dup
        pools[split] = kept
    test_questions = {it["question"] for it in pools["test"]}
    before = len(pools["train"])
    pools["train"] = [it for it in pools["train"] if it["question"] not in test_questions]
    stats["train_shares_question_with_test"] = before - len(pools["train"])
    out = {}
    for split, n in (("train", args.n_train), ("test", args.n_test)):
        pool = pools[split]
        stats[f"{split}_pool"] = len(pool)
        rng = random.Random(f"{args.seed}:{task}:{split}")
        out[split] = rng.sample(pool, min(n, len(pool)))
    return out["train"], out["test"], stats


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")


def summarize(task: str, train: list[dict], test: list[dict]) -> dict:
    def hist(items: list[dict]) -> list[int]:
        width = max(len(it["choices"]) for it in items)
        c = Counter(it["label"] for it in items)
        return [c.get(i, 0) for i in range(width)]

    both = train + test
    test_hist = hist(test)
    return {
        "n_train": len(train),
        "n_test": len(test),
        "train_labels": hist(train),
        "test_labels": test_hist,
        "test_majority_share": round(max(test_hist) / len(test), 4),
        "n_choices": sorted({len(it["choices"]) for it in both}),
        "mean_prompt_chars": round(sum(map(prompt_length, both)) / len(both), 1),
        "max_prompt_chars": max(map(prompt_length, both)),
        "max_answer_chars": max(len(c) for it in both for c in it["choices"]),
        "mean_answer_chars": round(
            sum(len(c) for it in both for c in it["choices"])
            / sum(len(it["choices"]) for it in both),
            1,
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in (
        "arc-easy-train",
        "arc-easy-dev",
        "arc-challenge-train",
        "arc-challenge-dev",
        "openbookqa-train",
        "openbookqa-dev",
        "commonsense-qa-train",
        "commonsense-qa-dev",
        "csqa2-train",
        "csqa2-dev",
        "winogrande-train",
        "winogrande-train-labels",
        "winogrande-dev",
        "winogrande-dev-labels",
    ):
        p.add_argument(f"--{name}", type=Path, required=True)
    p.add_argument("--out-dir", type=Path, default=Path("data/commonsense"))
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--n-train", type=int, default=N_TRAIN)
    p.add_argument("--n-test", type=int, default=N_TEST)
    p.add_argument("--max-prompt-chars", type=int, default=MAX_PROMPT_CHARS)
    args = p.parse_args(argv)

    def winogrande(docs_path: Path, labels_path: Path) -> list[dict]:
        docs, labels = read_jsonl(docs_path), read_labels(labels_path)
        if len(docs) != len(labels):
            raise SystemExit(f"{docs_path}: {len(docs)} lines but {len(labels)} labels")
        for d, lab in zip(docs, labels):
            if d.get("answer", lab) != lab:
                raise SystemExit(f"{docs_path}: {d['qID']} answer {d['answer']} != label {lab}")
            d["answer"] = lab
        return docs

    sources = {
        "arc_easy": (
            read_jsonl(args.arc_easy_train),
            read_jsonl(args.arc_easy_dev),
            lambda d: render_arc(d, "arc_easy"),
        ),
        "arc_challenge": (
            read_jsonl(args.arc_challenge_train),
            read_jsonl(args.arc_challenge_dev),
            lambda d: render_arc(d, "arc_challenge"),
        ),
        "openbookqa": (
            read_jsonl(args.openbookqa_train),
            read_jsonl(args.openbookqa_dev),
            render_openbookqa,
        ),
        "commonsense_qa": (
            read_jsonl(args.commonsense_qa_train),
            read_jsonl(args.commonsense_qa_dev),
            render_commonsense_qa,
        ),
        "csqa2": (read_jsonl(args.csqa2_train), read_jsonl(args.csqa2_dev), render_csqa2),
        "winogrande": (
            winogrande(args.winogrande_train, args.winogrande_train_labels),
            winogrande(args.winogrande_dev, args.winogrande_dev_labels),
            render_winogrande,
        ),
    }

    all_train: list[dict] = []
    all_test: list[dict] = []
    report: dict = {"seed": args.seed, "max_prompt_chars": args.max_prompt_chars, "tasks": {}}
    for task in TASK_ORDER:
        train_docs, dev_docs, render = sources[task]
        train, test, stats = slice_task(task, train_docs, dev_docs, render, args)
        stats.update(summarize(task, train, test))
        report["tasks"][task] = stats
        all_train += train
        all_test += test

    # Global guarantees (across tasks too): no duplicates, no train/test overlap.
    for name, items in (("train", all_train), ("test", all_test)):
        if len({key(it) for it in items}) != len(items):
            raise SystemExit(f"duplicate items in {name}")
    if {key(it) for it in all_train} & {key(it) for it in all_test}:
        raise SystemExit("train and test overlap")

    out_train, out_test = args.out_dir / "train.jsonl", args.out_dir / "test.jsonl"
    write_jsonl(out_train, all_train)
    write_jsonl(out_test, all_test)
    report["inputs_sha256"] = {
        name: _sha256(getattr(args, name.replace("-", "_")))
        for name in (
            "arc-easy-train",
            "arc-easy-dev",
            "arc-challenge-train",
            "arc-challenge-dev",
            "openbookqa-train",
            "openbookqa-dev",
            "commonsense-qa-train",
            "commonsense-qa-dev",
            "csqa2-train",
            "csqa2-dev",
            "winogrande-train",
            "winogrande-train-labels",
            "winogrande-dev",
            "winogrande-dev-labels",
        )
    }
    report["outputs_sha256"] = {p.name: _sha256(p) for p in (out_train, out_test)}
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
