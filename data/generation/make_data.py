"""Writes train.csv and test.csv of the generation study (deterministic: run it again and the
files are byte-identical). Three tasks, every item made up here from fixed word lists:

* number_words (generation): "Write 47 in words." -> "forty-seven" (0..199);
* reverse_words (generation): "Reverse the order of the words: red cup sun" -> "sun cup red";
* parity (multiple choice): "Is 47 an even number?" -> yes / no.

The CSV columns are the data's own names, mapped in config/generation.yaml (data.fields):
prompt, target (a generation answer), options (a JSON list of choices), gold (the correct
choice's text) and kind (the task); an empty cell is a missing field.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path

import pandas as pd

HERE = Path(__file__).resolve().parent
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
        "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
WORDS = ["red", "cup", "sun", "dog", "tree", "book", "milk", "rain", "fish", "hat", "door", "lamp",
         "bird", "road", "cake", "ship", "star", "king", "song", "wind"]


def in_words(n: int) -> str:
    if n < 20:
        return ONES[n]
    if n < 100:
        return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])
    rest = n % 100
    return ONES[n // 100] + " hundred" + ("" if rest == 0 else " and " + in_words(rest))


def rows(numbers: list[int], triples: list[tuple[str, ...]]) -> list[dict]:
    out = []
    for n in numbers:
        out.append({"kind": "number_words", "prompt": f"Write {n} in words.", "target": in_words(n)})
    for words in triples:
        out.append({"kind": "reverse_words", "prompt": f"Reverse the order of the words: {' '.join(words)}",
                    "target": " ".join(reversed(words))})
    for n in numbers:
        out.append({"kind": "parity", "prompt": f"Is {n} an even number?", "options": json.dumps(["yes", "no"]),
                    "gold": "yes" if n % 2 == 0 else "no"})
    return out


def main() -> None:
    rng = random.Random(1234)
    numbers = list(range(200))
    rng.shuffle(numbers)
    test_numbers, train_numbers = sorted(numbers[:50]), sorted(numbers[50:])
    # 200 distinct word triples: no test item is a training item, none repeats
    triples = rng.sample(list(itertools.permutations(WORDS, 3)), 200)
    columns = ["kind", "prompt", "target", "options", "gold"]
    pd.DataFrame(rows(train_numbers, triples[50:]), columns=columns).to_csv(HERE / "train.csv", index=False)
    pd.DataFrame(rows(test_numbers, triples[:50]), columns=columns).to_csv(HERE / "test.csv", index=False)


if __name__ == "__main__":
    main()
