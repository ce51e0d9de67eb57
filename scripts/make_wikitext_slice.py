#!/usr/bin/env python3
"""Make the general-text slice ``data/wikitext2/test.jsonl`` from WikiText-2's ``test.txt``.

Provenance only: this script is not run by CI or by the workflow, downloads
nothing and uses only the Python standard library. Give it the path of the raw
file (where it came from is written down in ``data/wikitext2/SOURCES.md``)::

    python scripts/make_wikitext_slice.py --test-txt wikitext-2/test.txt \\
        --out data/wikitext2/test.jsonl

An article starts at a line `` = Title = `` (single ``=`` on each side; section
headings are `` = = Heading = = ``) that has a blank line (`` ``) before and after
it, as every WikiText article title does (two formula lines inside the test split
look like titles but are not surrounded by blank lines). An article runs from its
title line up to, not including, the next title line. The first ``--articles``
articles are written, one JSON object a line, ``{"page": title, "text": lines}``,
where ``text`` is the article's lines exactly as in the file (WikiText's tokenised
form with ``@-@``, `` <unk>``, the leading space of every line and the blank
`` `` lines) joined with ``"\\n"``. Nothing else is changed. A summary (articles,
words by whitespace split, characters, sha256 of input and output) goes to stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

N_ARTICLES = 5
TITLE = re.compile(r"^ = (?!= )(.+) = $")


def article_starts(lines: list[str]) -> list[int]:
    return [
        i
        for i, line in enumerate(lines)
        if TITLE.match(line) and 0 < i < len(lines) - 1 and lines[i - 1] == " " == lines[i + 1]
    ]


def articles(text: str) -> list[dict]:
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the file ends with a newline
        lines.pop()
    starts = article_starts(lines)
    ends = [*starts[1:], len(lines)]
    return [
        {"page": TITLE.match(lines[i]).group(1), "text": "\n".join(lines[i:j])}
        for i, j in zip(starts, ends)
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test-txt", type=Path, required=True)
    p.add_argument("--out", type=Path, default=Path("data/wikitext2/test.jsonl"))
    p.add_argument("--articles", type=int, default=N_ARTICLES)
    args = p.parse_args(argv)

    raw = args.test_txt.read_bytes()
    docs = articles(raw.decode("utf-8"))
    chosen = docs[: args.articles]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", encoding="utf-8", newline="\n") as f:
        for d in chosen:
            f.write(json.dumps(d, ensure_ascii=False) + "\n")
    out = args.out.read_bytes()
    report = {
        "input_sha256": hashlib.sha256(raw).hexdigest(),
        "articles_in_input": len(docs),
        "articles": len(chosen),
        "pages": [d["page"] for d in chosen],
        "words_per_article": [len(d["text"].split()) for d in chosen],
        "words": sum(len(d["text"].split()) for d in chosen),
        "characters": sum(len(d["text"]) for d in chosen),
        "output_bytes": len(out),
        "output_sha256": hashlib.sha256(out).hexdigest(),
    }
    json.dump(report, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
