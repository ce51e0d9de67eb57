#!/usr/bin/env python3
"""Make the multi-task classification slices in ``data/multitask/`` from the raw source files.

Provenance only: this script is not run by CI or by the workflow, downloads
nothing and uses only the Python standard library. Give it the paths of the raw
files (where they came from is written down in ``data/multitask/SOURCES.md``)::

    python scripts/make_multitask_slices.py \\
        --sst2-train stsa.binary.train --sst2-test stsa.binary.test \\
        --ag-news-train agnews/dev.tsv --ag-news-test agnews/test.tsv \\
        --trec-train trec/train.txt --trec-test trec/test.txt \\
        --rte-train rte/train.jsonl --rte-test rte/val.jsonl \\
        --cb-train cb/train.jsonl --cb-test cb/val.jsonl \\
        --sick-train SICK_train.txt --sick-test SICK_test_annotated.txt \\
        --mrpc-train msr_paraphrase_train.txt --mrpc-test msr_paraphrase_test.txt \\
        --copa-train copa/train.jsonl copa/unlabeled.jsonl --copa-test copa/val.jsonl \\
        --wic-zip WiC_dataset.zip \\
        --out-dir data/multitask

For every task the official training split gives the training slice; the official
test split gives the test slice where its labels are public, otherwise the official
validation split does (RTE, CB, COPA). Each item is rendered in the harness's format
``{"question", "choices", "label", "task", "family"}`` (the harness prompts with
``question + "\\nAnswer:"`` and scores ``" " + choice``); the choices are short label
words, the same for every item of a task.

Filters, in this order, per split: items whose prompt is longer than
``--max-prompt-chars`` are dropped; items whose underlying text (the sentence, or the
sentence pair in either order, normalised: lower case, whitespace collapsed) occurs
more than once in the split are deduplicated (the first is kept; if the copies
disagree on the label, all of them are dropped); then training items are dropped
whose underlying text occurs anywhere in the test split (not only in the drawn
slice) and, for every task but SICK, also those that share any one sentence with the
test split (an RTE premise or hypothesis, an MRPC or WiC sentence, a COPA premise or
alternative); SICK's official splits reuse the same sentences in different pairs by
design, so for SICK only whole pairs are matched. The test slice is a seeded random
draw of ``--n-test`` items from the pool (all of them, in a seeded random order,
where the pool is smaller), so its label distribution follows the source. The training slice is label-balanced: ``n`` items
of every label, ``n = min(--n-train // n_labels, smallest label's pool)``, drawn
with :class:`random.Random` seeded by ``"{seed}:{task}:train"`` and then shuffled.
The output files hold the tasks in :data:`TASK_ORDER`, one block each. A summary
(counts, filters, label distributions, prompt lengths, sha256 of inputs and
outputs) goes to stdout as JSON.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SEED = 20250301
N_TRAIN = 600
N_TEST = 500
MAX_PROMPT_CHARS = 600
PROMPT_SUFFIX = "\nAnswer:"  # what the harness appends to ``question`` (harness.data.prompts)

TASK_ORDER = ("sst2", "ag_news", "trec", "rte", "cb", "sick", "mrpc", "copa", "wic")


@dataclass(frozen=True)
class Doc:
    """One source example: its text fields, gold label index and what renders it."""

    texts: tuple[str, ...]  # the underlying text (1 sentence or a pair), used for overlap
    label: int
    fields: dict


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    choices: tuple[str, ...]
    render: Callable[[Doc], str]  # -> question text
    # How a training item is matched against the test split: "text" = the whole
    # underlying text (a pair in either order); "sentence" = any one of its sentences.
    overlap: str = "sentence"


# ----------------------------------------------------------------------------- rendering

SST2_Q = "Is the sentiment of this review negative or positive?"
AG_NEWS_Q = "Which topic is this article about: World, Sports, Business or Science?"
TREC_Q = (
    "Is the answer to this question an abbreviation, an entity, a description, "
    "a person, a location or a number?"
)
MRPC_Q = "Question: Do both sentences mean the same thing?"  # lm-eval ``mrpc``
COPA_Q = (
    "Question: Which alternative is the more plausible {relation} of the premise, "
    "the first or the second?"
)


def render_sst2(d: Doc) -> str:
    return f"Review: {d.texts[0]}\n{SST2_Q}"


def render_ag_news(d: Doc) -> str:
    return f"Article: {d.texts[0]}\n{AG_NEWS_Q}"


def render_trec(d: Doc) -> str:
    return f"Question: {d.texts[0]}\n{TREC_Q}"


def render_rte(d: Doc) -> str:
    """lm-eval ``rte`` (GLUE/SuperGLUE): ``{premise}\\nQuestion: {hypothesis} True or False?``."""
    return f"{d.texts[0]}\nQuestion: {d.texts[1]} True or False?"


def render_cb(d: Doc) -> str:
    """lm-eval ``cb``: ``{premise}\\nQuestion: {hypothesis}. True, False, or Neither?``."""
    return f"{d.texts[0]}\nQuestion: {d.texts[1]}. True, False, or Neither?"


def render_mrpc(d: Doc) -> str:
    """lm-eval ``mrpc``: ``Sentence 1: …\\nSentence 2: …\\nQuestion: Do both … same thing?``."""
    return f"Sentence 1: {d.texts[0]}\nSentence 2: {d.texts[1]}\n{MRPC_Q}"


def render_copa(d: Doc) -> str:
    premise, first, second = d.texts
    return (
        f"Premise: {premise}\nFirst alternative: {first}\nSecond alternative: {second}\n"
        + COPA_Q.format(relation=d.fields["relation"])
    )


def render_wic(d: Doc) -> str:
    """lm-eval ``wic``, the word as it appears in sentence 1."""
    return (
        f"Sentence 1: {d.texts[0]}\nSentence 2: {d.texts[1]}\n"
        f"Question: Is the word '{d.fields['word']}' used in the same way in the two "
        "sentences above?"
    )


TASKS = {
    t.name: t
    for t in (
        Task("sst2", "sentiment", ("negative", "positive"), render_sst2),
        Task("ag_news", "topic", ("World", "Sports", "Business", "Science"), render_ag_news),
        Task(
            "trec",
            "topic",
            ("abbreviation", "entity", "description", "person", "location", "number"),
            render_trec,
        ),
        Task("rte", "nli", ("True", "False"), render_rte),
        Task("cb", "nli", ("True", "False", "Neither"), render_cb),
        # SICK pairs are built from a small pool of sentences that both official splits
        # reuse: matching single sentences would leave almost no training items.
        Task("sick", "nli", ("True", "False", "Neither"), render_cb, overlap="text"),
        Task("mrpc", "paraphrase", ("no", "yes"), render_mrpc),
        Task("copa", "reasoning", ("first", "second"), render_copa),
        Task("wic", "word_sense", ("no", "yes"), render_wic),
    )
}


# ----------------------------------------------------------------------------- reading


def _clean(text: str) -> str:
    return text.strip()


def _lines(path: Path, encoding: str = "utf-8-sig") -> list[str]:
    with open(path, encoding=encoding, newline="") as f:
        return [ln for ln in (raw.rstrip("\n").rstrip("\r") for raw in f) if ln.strip()]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(ln) for ln in _lines(path)]


def read_sst2(path: Path) -> list[Doc]:
    """``stsa.binary.*``: ``<0|1> <tokenised sentence>`` (0 negative, 1 positive)."""
    docs = []
    for ln in _lines(path):
        label, text = ln.split(" ", 1)
        docs.append(Doc((_clean(text),), int(label), {}))
    return docs


AG_NEWS_LABELS = {"World": 0, "Sports": 1, "Business": 2, "Sci/Tech": 3}


def read_ag_news(path: Path) -> list[Doc]:
    """alps ``agnews/*.tsv``: ``<description>\\t<World|Sports|Business|Sci/Tech>``, no header."""
    docs = []
    for ln in _lines(path):
        text, label = ln.rsplit("\t", 1)
        docs.append(Doc((_clean(text),), AG_NEWS_LABELS[label.strip()], {}))
    return docs


TREC_LABELS = {"ABBR": 0, "ENTY": 1, "DESC": 2, "HUM": 3, "LOC": 4, "NUM": 5}


def read_trec(path: Path) -> list[Doc]:
    """``trec/*.txt``: ``<COARSE>:<fine> <question>``; the coarse class is the label."""
    docs = []
    for ln in _lines(path, encoding="latin-1" if _not_utf8(path) else "utf-8-sig"):
        tag, text = ln.split(" ", 1)
        coarse, fine = tag.split(":", 1)
        docs.append(Doc((_clean(text),), TREC_LABELS[coarse], {"fine": fine}))
    return docs


def _not_utf8(path: Path) -> bool:
    try:
        path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


RTE_LABELS = {"entailment": 0, "not_entailment": 1}
CB_LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}


def read_rte(path: Path) -> list[Doc]:
    return [
        Doc((_clean(d["premise"]), _clean(d["hypothesis"])), RTE_LABELS[d["label"]], {})
        for d in _jsonl(path)
    ]


def read_cb(path: Path) -> list[Doc]:
    return [
        Doc((_clean(d["premise"]), _clean(d["hypothesis"])), CB_LABELS[d["label"]], {})
        for d in _jsonl(path)
    ]


SICK_LABELS = {"ENTAILMENT": 0, "CONTRADICTION": 1, "NEUTRAL": 2}


def read_sick(path: Path) -> list[Doc]:
    """``SICK_*.txt``: header, then ``pair_ID\\tA\\tB\\trelatedness\\tentailment_judgment``."""
    rows = [ln.split("\t") for ln in _lines(path)]
    header, rows = rows[0], rows[1:]
    ia, ib = header.index("sentence_A"), header.index("sentence_B")
    il = header.index("entailment_judgment")
    return [Doc((_clean(r[ia]), _clean(r[ib])), SICK_LABELS[r[il].strip()], {}) for r in rows]


def read_mrpc(path: Path) -> list[Doc]:
    """``msr_paraphrase_*.txt``: header, then ``Quality\\t#1 ID\\t#2 ID\\t#1 String\\t#2 String``."""
    rows = [ln.split("\t") for ln in _lines(path)]
    header, rows = rows[0], rows[1:]
    if header[0] != "Quality" or any(len(r) != 5 for r in rows):
        raise SystemExit(f"{path}: unexpected MRPC layout")
    return [Doc((_clean(r[3]), _clean(r[4])), int(r[0]), {}) for r in rows]


def read_copa(paths: list[Path]) -> list[Doc]:
    """SuperGLUE ``COPA`` JSONL (``premise``, ``choice1``, ``choice2``, ``question``, ``label``)."""
    docs = [d for p in paths for d in _jsonl(p)]
    docs.sort(key=lambda d: d["idx"])
    return [
        Doc(
            (_clean(d["premise"]), _clean(d["choice1"]), _clean(d["choice2"])),
            int(d["label"]),
            {"relation": d["question"]},
        )
        for d in docs
    ]


def read_wic(zip_path: Path, split: str) -> list[Doc]:
    """WiC package: ``{split}/{split}.data.txt`` (word, PoS, i1-i2, s1, s2) + ``.gold.txt``."""
    with zipfile.ZipFile(zip_path) as z:
        data = z.read(f"{split}/{split}.data.txt").decode("utf-8").splitlines()
        gold = z.read(f"{split}/{split}.gold.txt").decode("utf-8").split()
    data = [ln for ln in data if ln.strip()]
    if len(data) != len(gold):
        raise SystemExit(f"{zip_path}:{split}: {len(data)} items but {len(gold)} labels")
    docs = []
    for ln, g in zip(data, gold):
        lemma, _pos, idx, s1, s2 = ln.split("\t")
        i1, _ = (int(i) for i in idx.split("-"))
        word = s1.split(" ")[i1]
        docs.append(
            Doc((_clean(s1), _clean(s2)), {"F": 0, "T": 1}[g], {"word": word, "lemma": lemma})
        )
    return docs


# ----------------------------------------------------------------------------- slicing


def norm(text: str) -> str:
    return " ".join(text.lower().split())


def text_key(doc: Doc) -> tuple[str, ...]:
    """The underlying text of an item (normalised); a pair is compared in either order."""
    return tuple(sorted(norm(t) for t in doc.texts))


def prompt_length(question: str) -> int:
    return len(question) + len(PROMPT_SUFFIX)


def make_item(task: Task, doc: Doc) -> dict:
    question = task.render(doc)
    if not 0 <= doc.label < len(task.choices):
        raise ValueError(f"{task.name}: label {doc.label} out of range")
    return {
        "question": question,
        "choices": list(task.choices),
        "label": doc.label,
        "task": task.name,
        "family": task.family,
    }


def _pool(task: Task, docs: list[Doc], split: str, args, stats: dict) -> list[tuple]:
    """(key, doc, item) triples after the length cap and within-split deduplication."""
    rendered = [(text_key(d), d, make_item(task, d)) for d in docs]
    kept = [r for r in rendered if prompt_length(r[2]["question"]) <= args.max_prompt_chars]
    stats[f"{split}_over_length_cap"] = len(rendered) - len(kept)
    labels_by_key: dict[tuple, set[int]] = {}
    for key, _, it in kept:
        labels_by_key.setdefault(key, set()).add(it["label"])
    conflicting = {key for key, labs in labels_by_key.items() if len(labs) > 1}
    n_conflicting = sum(1 for key, _, _ in kept if key in conflicting)
    seen: set = set()
    out = []
    for r in kept:
        if r[0] in conflicting or r[0] in seen:
            continue
        seen.add(r[0])
        out.append(r)
    stats[f"{split}_conflicting_label_duplicates"] = n_conflicting
    stats[f"{split}_duplicates"] = len(kept) - len(out) - n_conflicting
    return out


def slice_task(task: Task, train_docs: list[Doc], test_docs: list[Doc], args) -> tuple:
    stats: dict = {"source_train": len(train_docs), "source_test": len(test_docs)}
    train_pool = _pool(task, train_docs, "train", args, stats)
    test_pool = _pool(task, test_docs, "test", args, stats)
    # against the whole test split, not only the drawn slice (stricter)
    test_keys = {text_key(d) for d in test_docs}
    test_sentences = {norm(t) for d in test_docs for t in d.texts}
    before = len(train_pool)
    train_pool = [r for r in train_pool if r[0] not in test_keys]
    stats["train_shares_text_with_test"] = before - len(train_pool)
    before = len(train_pool)
    shares_sentence = [any(norm(t) in test_sentences for t in d.texts) for _, d, _ in train_pool]
    if task.overlap == "sentence":
        train_pool = [r for r, shared in zip(train_pool, shares_sentence) if not shared]
        stats["train_shares_a_sentence_with_test"] = before - len(train_pool)
    else:  # kept, counted
        stats["train_pool_sharing_a_sentence_with_test_kept"] = sum(shares_sentence)
    stats["train_pool"] = len(train_pool)
    stats["test_pool"] = len(test_pool)

    # test: seeded random draw (all items, shuffled, where the pool is smaller)
    rng = random.Random(f"{args.seed}:{task.name}:test")
    pool = [it for _, _, it in test_pool]
    test = rng.sample(pool, min(args.n_test, len(pool)))

    # train: label-balanced
    k = len(task.choices)
    by_label = {lab: [it for _, _, it in train_pool if it["label"] == lab] for lab in range(k)}
    per_label = min(args.n_train // k, *(len(v) for v in by_label.values()))
    rng = random.Random(f"{args.seed}:{task.name}:train")
    train = []
    for lab in range(k):
        train += rng.sample(by_label[lab], per_label)
    rng.shuffle(train)
    stats["train_pool_labels"] = [len(by_label[lab]) for lab in range(k)]
    stats["train_per_label"] = per_label
    return train, test, stats


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for it in items:
            f.write(json.dumps(it, ensure_ascii=False) + "\n")


def summarize(task: Task, train: list[dict], test: list[dict]) -> dict:
    def hist(items: list[dict]) -> list[int]:
        c = Counter(it["label"] for it in items)
        return [c.get(i, 0) for i in range(len(task.choices))]

    both = train + test
    test_hist = hist(test)
    lengths = [prompt_length(it["question"]) for it in both]
    return {
        "family": task.family,
        "choices": list(task.choices),
        "n_train": len(train),
        "n_test": len(test),
        "train_labels": hist(train),
        "test_labels": test_hist,
        "test_majority_share": round(max(test_hist) / len(test), 4),
        "mean_prompt_chars": round(sum(lengths) / len(lengths), 1),
        "max_prompt_chars": max(lengths),
    }


INPUTS = (
    "sst2-train",
    "sst2-test",
    "ag-news-train",
    "ag-news-test",
    "trec-train",
    "trec-test",
    "rte-train",
    "rte-test",
    "cb-train",
    "cb-test",
    "sick-train",
    "sick-test",
    "mrpc-train",
    "mrpc-test",
    "copa-test",
    "wic-zip",
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in INPUTS:
        p.add_argument(f"--{name}", type=Path, required=True)
    p.add_argument("--copa-train", type=Path, nargs="+", required=True)
    p.add_argument("--out-dir", type=Path, default=Path("data/multitask"))
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--n-train", type=int, default=N_TRAIN)
    p.add_argument("--n-test", type=int, default=N_TEST)
    p.add_argument("--max-prompt-chars", type=int, default=MAX_PROMPT_CHARS)
    args = p.parse_args(argv)

    sources = {
        "sst2": (read_sst2(args.sst2_train), read_sst2(args.sst2_test)),
        "ag_news": (read_ag_news(args.ag_news_train), read_ag_news(args.ag_news_test)),
        "trec": (read_trec(args.trec_train), read_trec(args.trec_test)),
        "rte": (read_rte(args.rte_train), read_rte(args.rte_test)),
        "cb": (read_cb(args.cb_train), read_cb(args.cb_test)),
        "sick": (read_sick(args.sick_train), read_sick(args.sick_test)),
        "mrpc": (read_mrpc(args.mrpc_train), read_mrpc(args.mrpc_test)),
        "copa": (read_copa(args.copa_train), read_copa([args.copa_test])),
        "wic": (read_wic(args.wic_zip, "train"), read_wic(args.wic_zip, "test")),
    }

    all_train: list[dict] = []
    all_test: list[dict] = []
    report: dict = {
        "seed": args.seed,
        "n_train": args.n_train,
        "n_test": args.n_test,
        "max_prompt_chars": args.max_prompt_chars,
        "tasks": {},
    }
    for name in TASK_ORDER:
        task = TASKS[name]
        train, test, stats = slice_task(task, *sources[name], args)
        stats.update(summarize(task, train, test))
        report["tasks"][name] = stats
        all_train += train
        all_test += test

    # Global guarantees: no repeated question within a file, none shared by the two.
    for split, items in (("train", all_train), ("test", all_test)):
        if len({it["question"] for it in items}) != len(items):
            raise SystemExit(f"duplicate questions in {split}")
    if {it["question"] for it in all_train} & {it["question"] for it in all_test}:
        raise SystemExit("train and test share a question")

    out_train, out_test = args.out_dir / "train.jsonl", args.out_dir / "test.jsonl"
    write_jsonl(out_train, all_train)
    write_jsonl(out_test, all_test)
    inputs = {name: _sha256(getattr(args, name.replace("-", "_"))) for name in INPUTS}
    for path in args.copa_train:
        inputs[f"copa-train:{path.name}"] = _sha256(path)
    report["inputs_sha256"] = inputs
    report["outputs"] = {
        p.name: {"items": n, "bytes": p.stat().st_size, "sha256": _sha256(p)}
        for p, n in ((out_train, len(all_train)), (out_test, len(all_test)))
    }
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
