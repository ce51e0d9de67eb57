"""The committed WikiText-2 slice (``data/wikitext2/test.jsonl``) is well formed and as documented.

Checks only the committed file (nothing is generated or downloaded): one JSON object a
line with exactly ``page`` and ``text``, the documented articles in the documented
order, each text starting with its own title line and holding no other article title,
the documented numbers of words (whitespace split) and characters, and the sha256
recorded in ``SOURCES.md``. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "wikitext2"
PAGES = (
    "Robert <unk>",
    "Du Fu",
    "Kiss You ( One Direction song )",
    "<unk> @-@ class battleship",
    "Dick <unk>",
)
WORDS = (1091, 4749, 2432, 7102, 2023)  # per article, whitespace split
TOTAL_WORDS = 17397
TOTAL_CHARS = 87565
TITLE = re.compile(r"^ = (?!= )(.+) = $")


@pytest.fixture(scope="module")
def articles() -> list[dict]:
    text = (DATA_DIR / "test.jsonl").read_text(encoding="utf-8")
    assert text.endswith("\n"), "test.jsonl must end with a newline"
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def test_format_and_documented_articles(articles):
    assert [a["page"] for a in articles] == list(PAGES)
    for a in articles:
        assert set(a) == {"page", "text"}
        assert isinstance(a["page"], str) and isinstance(a["text"], str)
        lines = a["text"].split("\n")
        assert lines[0] == f" = {a['page']} = ", "an article starts with its own title line"
        for i in range(1, len(lines) - 1):  # no second article title inside
            is_title = TITLE.match(lines[i]) and lines[i - 1] == " " == lines[i + 1]
            assert not is_title, f"{a['page']}: a second article starts at line {i + 1}"
        assert all(line.startswith(" ") for line in lines), "WikiText lines start with a space"
        assert "<unk>" in a["text"] or "@-@" in a["text"], "the tokenised form is kept"


def test_documented_size(articles):
    assert [len(a["text"].split()) for a in articles] == list(WORDS)
    assert sum(len(a["text"].split()) for a in articles) == TOTAL_WORDS
    assert 12_000 <= TOTAL_WORDS <= 20_000
    assert sum(len(a["text"]) for a in articles) == TOTAL_CHARS


def test_sources_record_the_sizes_and_sha256():
    sources = (DATA_DIR / "SOURCES.md").read_text(encoding="utf-8")
    assert f"{TOTAL_WORDS:,}" in sources and f"{TOTAL_CHARS:,}" in sources
    recorded = re.search(r"`test\.jsonl`[^\n]*?`([0-9a-f]{64})`", sources)
    assert recorded, "SOURCES.md records no sha256 for test.jsonl"
    actual = hashlib.sha256((DATA_DIR / "test.jsonl").read_bytes()).hexdigest()
    assert actual == recorded.group(1), "test.jsonl differs from the recorded sha256"
