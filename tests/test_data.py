"""The data package: generated suite, prompts, JSONL validation, lm-eval task folder, data step."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from harness.data import (
    FAMILIES,
    POOLS,
    TASKS,
    DataError,
    build_prompt,
    continuation,
    generate_suite,
    load_jsonl,
    prepare_data,
    write_jsonl,
    write_task_folder,
)
from harness.data.prompts import LM_EVAL_DOC_TO_TEXT, PROMPT_TEMPLATE, TARGET_DELIMITER
from harness.data.suite import WORD_CATEGORY

SMALL = {"train_per_task": 30, "test_per_task": 13}  # not multiples of 4: balance is "within 1"


def _words(item: dict) -> list[str]:
    """The word list of an item, in question order."""
    line = item["question"].split("\n")[1]
    assert line.startswith("Words: ")
    return line.removeprefix("Words: ").split(" ")


def _answer(item: dict) -> str:
    return item["choices"][item["label"]]


# --------------------------------------------------------------------------- suite


def test_pools_and_tasks_are_as_specified():
    sizes = {cat: len(words) for cat, words in POOLS.items()}
    assert sizes == {"animal": 21, "color": 11, "fruit": 10, "vehicle": 10, "clothing": 10, "tool": 10}
    assert len(WORD_CATEGORY) == sum(sizes.values())  # no word in two pools
    assert all(w.isalpha() and w.islower() for w in WORD_CATEGORY)
    assert list(TASKS) == ["animal", "color", "fruit", "vehicle", "clothing", "tool"]
    assert TASKS["fruit"] == ("pick the fruit.", "nature")
    assert TASKS["tool"] == ("pick the tool.", "artifact")
    assert FAMILIES == {"nature": ("animal", "color", "fruit"), "artifact": ("vehicle", "clothing", "tool")}
    assert all(TASKS[t].family == fam for fam, ts in FAMILIES.items() for t in ts)


def test_suite_is_deterministic_and_seed_dependent():
    a = generate_suite(seed=7, **SMALL)
    b = generate_suite(seed=7, **SMALL)
    c = generate_suite(seed=8, **SMALL)
    assert a == b
    assert a["train"] != c["train"] and a["test"] != c["test"]
    item = a["train"][0]
    assert set(item) == {"question", "choices", "label", "task", "family"}
    assert (
        item["question"]
        == f"Task: {TASKS[item['task']].instruction}\nWords: {' '.join(_words(item))}"
    )


def test_suite_streams_do_not_depend_on_selection_or_train_size():
    full = generate_suite(seed=3, **SMALL)
    only_color = generate_suite(seed=3, tasks=["color"], **SMALL)
    for split in ("train", "test"):
        assert only_color[split] == [i for i in full[split] if i["task"] == "color"]
    bigger_train = generate_suite(seed=3, train_per_task=50, test_per_task=13)
    assert bigger_train["test"] == full["test"]
    reordered = generate_suite(seed=3, tasks=["tool", "animal"], **SMALL)
    assert [i["task"] for i in reordered["test"][:: SMALL["test_per_task"]]] == ["tool", "animal"]


def test_labels_balanced_and_every_task_in_every_split():
    suite = generate_suite(seed=11, **SMALL)
    for split, n in (("train", SMALL["train_per_task"]), ("test", SMALL["test_per_task"])):
        items = suite[split]
        assert Counter(i["task"] for i in items) == dict.fromkeys(TASKS, n)
        for task in TASKS:
            labels = [i["label"] for i in items if i["task"] == task]
            assert len(labels) == n and set(labels) == {0, 1, 2, 3}
            for end in range(1, n + 1):  # every prefix too (what lm-eval's limit evaluates)
                counts = [labels[:end].count(k) for k in range(4)]
                assert max(counts) - min(counts) <= 1, (split, task, end, counts)


def test_same_words_line_conflicting_answers():
    """The conflict is real: one word list, asked under different instructions, has different
    correct answers, within a family and across families."""
    suite = generate_suite(seed=5, **SMALL)
    by_line: dict[str, dict[str, dict]] = defaultdict(dict)
    for item in suite["train"]:
        by_line[item["question"].split("\n")[1]][item["task"]] = item
    shared = 0
    pairs = Counter()
    for line, items in by_line.items():
        words = _words(next(iter(items.values())))
        categories = [WORD_CATEGORY[w] for w in words]
        assert len(set(categories)) == 4  # four words of four different categories
        assert set(items) <= set(categories)  # emitted only for tasks whose category it holds
        for item in items.values():
            assert _words(item) == words
            assert sorted(item["choices"]) == sorted(words)  # the choices are the list's words
            assert WORD_CATEGORY[_answer(item)] == item["task"]
        answers = {t: _answer(i) for t, i in items.items()}
        assert len(set(answers.values())) == len(answers), line  # every task a different answer
        if len(items) > 1:
            shared += 1
            for a in items:
                for b in items:
                    if a < b:
                        pairs[TASKS[a].family == TASKS[b].family] += 1
    assert shared >= 0.9 * len(by_line)  # almost every list is asked under several tasks
    assert pairs[True] > 0 and pairs[False] > 0  # conflicts within and across families


def test_no_test_word_occurs_in_training():
    suite = generate_suite(seed=1234, train_per_task=256, test_per_task=100)
    train_words = {w for i in suite["train"] for w in _words(i)}
    test_words = {w for i in suite["test"] for w in _words(i)}
    assert not train_words & test_words
    for category in TASKS:  # every category has words in both splits
        assert train_words & set(POOLS[category]) and test_words & set(POOLS[category])
    train_sets = [frozenset(_words(i)) for i in suite["train"]]
    assert len(set(train_sets)) == len({i["question"].split("\n")[1] for i in suite["train"]})


def test_unknown_task_and_bad_sizes_are_refused():
    with pytest.raises(
        ValueError,
        match=r"unknown task 'colour' \(valid tasks: animal, color, fruit, vehicle, clothing, tool\)",
    ):
        generate_suite(tasks=["animal", "colour"])
    with pytest.raises(ValueError, match="test_per_task must be >= 1"):
        generate_suite(test_per_task=0)
    with pytest.raises(ValueError, match="seed must be an integer"):
        generate_suite(seed="1")


# --------------------------------------------------------------------------- prompts


def test_prompt_and_continuation():
    item = generate_suite(seed=1, train_per_task=4, test_per_task=4)["test"][0]
    assert build_prompt(item) == build_prompt(item["question"]) == item["question"] + "\nAnswer:"
    assert PROMPT_TEMPLATE == "{question}\nAnswer:" and TARGET_DELIMITER == " "
    assert LM_EVAL_DOC_TO_TEXT.replace("{{question}}", "{question}") == PROMPT_TEMPLATE
    assert continuation("cat") == " cat"
    assert build_prompt("has {braces}") == "has {braces}\nAnswer:"


# --------------------------------------------------------------------------- JSONL

GOOD = {"question": "2 + 2 =", "choices": ["3", "4", "5"], "label": 1}


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        (
            '{"question": "q" "choices": ["a", "b"], "label": 0}',
            "invalid JSON (Expecting ',' delimiter",
        ),
        (
            '{"question": "q", "choices": ["a", "b"]}',
            "missing field 'label' (required: question, choices, label; optional: task)",
        ),
        (
            '{"question": "q", "choices": ["a", "b", "c"], "label": 4}',
            "label 4 out of range for 3 choices (valid: 0..2)",
        ),
        (
            '{"question": "q", "choices": "a b", "label": 0}',
            "choices must be a list of at least 2 strings, got str",
        ),
        (
            '{"question": "q", "choices": ["a"], "label": 0}',
            "choices must be a list of at least 2 strings, got a list of 1",
        ),
        (
            '{"question": "q", "choices": ["a", 2], "label": 0}',
            "choices must be a list of at least 2 strings, got int at index 1",
        ),
        (
            '{"question": "q", "choices": ["a", "b"], "label": true}',
            "label must be an integer index into choices (valid: 0..1), got bool",
        ),
        (
            '{"question": "", "choices": ["a", "b"], "label": 0}',
            "question must be a non-empty string",
        ),
        (
            '{"question": "q", "choices": ["a", "b"], "label": 0, "task": 3}',
            "task must be a non-empty string",
        ),
        ('["q", ["a", "b"], 0]', "expected a JSON object"),
    ],
)
def test_jsonl_errors_name_file_line_and_what_is_valid(tmp_path, bad_line, expected):
    # line 1 good, line 2 blank (still counted), line 3 good, line 4 bad
    path = _write_lines(tmp_path / "x.jsonl", [json.dumps(GOOD), "", json.dumps(GOOD), bad_line])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    message = str(err.value)
    assert message.startswith(f"{path}:4: "), message
    assert expected in message


def test_jsonl_empty_and_missing_files(tmp_path):
    empty = _write_lines(tmp_path / "empty.jsonl", ["", "   "])
    with pytest.raises(
        DataError, match=r"empty\.jsonl: file is empty \(expected one JSON object per line"
    ):
        load_jsonl(empty)
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(DataError, match=r"nope\.jsonl: file not found"):
        load_jsonl(missing)
    assert issubclass(DataError, ValueError)


def test_jsonl_loads_through_datasets_with_task_defaults(tmp_path):
    rows = [
        GOOD,
        {**GOOD, "task": "math", "id": 7},
        {"question": "Pick ü", "choices": ["ü", "u"], "label": 0, "task": "unicode"},
    ]
    path = _write_lines(
        tmp_path / "mixed.jsonl", [json.dumps(rows[0]), "", *map(json.dumps, rows[1:])]
    )
    items = load_jsonl(path)
    assert items == [
        {**GOOD, "task": "mixed"},
        {**GOOD, "task": "math", "id": 7},
        {"question": "Pick ü", "choices": ["ü", "u"], "label": 0, "task": "unicode"},
    ]
    assert load_jsonl(path, default_task="arith")[0]["task"] == "arith"
    assert all(type(i["label"]) is int and type(i["choices"]) is list for i in items)
    # rewriting the same path is never answered from a stale datasets cache
    _write_lines(path, [json.dumps({**GOOD, "label": 2})])
    assert load_jsonl(path) == [{**GOOD, "label": 2, "task": "mixed"}]


def test_write_jsonl_is_atomic_and_only_writes_changes(tmp_path):
    items = generate_suite(seed=2, train_per_task=4, test_per_task=4)["test"]
    path = tmp_path / "sub" / "items.jsonl"
    assert write_jsonl(items, path) is True
    before = path.stat().st_mtime_ns
    assert write_jsonl(items, path) is False
    assert path.stat().st_mtime_ns == before
    assert load_jsonl(path) == items  # round trip, extra field "family" kept
    assert write_jsonl(items[:3], path) is True
    assert len(load_jsonl(path)) == 3
    assert [p.name for p in path.parent.iterdir()] == ["items.jsonl"]  # no temp files left


# --------------------------------------------------------------------------- lm-eval


def _load_suite(folder: Path, group: str = "moelora_suite"):
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    return manager.load(group)


def _check_task_docs(task, items: list[dict]) -> None:
    docs = list(task.test_docs())
    assert len(docs) == len(items)
    for doc, item in zip(docs, items):  # lm-eval keeps the file's order
        assert task.doc_to_text(doc) == build_prompt(item)
        assert task.doc_to_choice(doc) == item["choices"]
        assert task.doc_to_target(doc) == item["label"]


def test_lm_eval_reads_the_task_folder_and_it_is_relocatable(tmp_path):
    summary = prepare_data(
        {"source": "generated", "seed": 9, "train_per_task": 8, "test_per_task": 6}, tmp_path / "a"
    )
    test_items = generate_suite(seed=9, train_per_task=8, test_per_task=6)["test"]
    by_task = defaultdict(list)
    for item in test_items:
        by_task[item["task"]].append(item)

    loaded = _load_suite(tmp_path / "a" / "tasks")
    names = [f"moelora_{t}" for t in TASKS]
    assert summary["group"] == "moelora_suite" and summary["tasks"] == names
    assert loaded["group_map"] == {"moelora_suite": names}
    assert sorted(loaded["tasks"]) == sorted(names)
    for t in TASKS:
        _check_task_docs(loaded["tasks"][f"moelora_{t}"], by_task[t])

    # the exact strings lm-eval will score: (context, " " + choice) for every choice
    task = loaded["tasks"]["moelora_animal"]
    task.build_all_requests(limit=None, rank=0, world_size=1)
    got = sorted((i.doc_id, i.idx, i.arguments) for i in task.instances)
    want = sorted(
        (d, c, (build_prompt(item), continuation(choice)))
        for d, item in enumerate(by_task["animal"])
        for c, choice in enumerate(item["choices"])
    )
    assert got == want
    assert (
        task.config.output_type == "multiple_choice"
        and task.config.target_delimiter == TARGET_DELIMITER
    )

    # relocatable: copy the folder elsewhere, remove the original, load again
    moved = tmp_path / "elsewhere" / "tasks"
    shutil.copytree(tmp_path / "a" / "tasks", moved)
    shutil.rmtree(tmp_path / "a")
    again = _load_suite(moved)
    assert again["group_map"] == {"moelora_suite": names}
    for t in ("animal", "fruit"):
        _check_task_docs(again["tasks"][f"moelora_{t}"], by_task[t])


def test_group_aggregates_mean_acc_and_acc_norm_unweighted(tmp_path):
    import yaml

    folder = tmp_path / "tasks"
    items = generate_suite(seed=1, tasks=["tool", "color"], train_per_task=4, test_per_task=8)[
        "test"
    ]
    info = write_task_folder(items, folder, prefix="mine")
    assert info["group"] == "mine_suite" and info["tasks"] == ["mine_tool", "mine_color"]
    assert info["folder"] == str(folder)
    group = yaml.safe_load((folder / "mine_suite.yaml").read_text())
    assert group["task"] == ["mine_tool", "mine_color"]
    assert group["aggregate_metric_list"] == [
        {"metric": "acc", "aggregation": "mean", "weight_by_size": False},
        {"metric": "acc_norm", "aggregation": "mean", "weight_by_size": False},
    ]
    task = yaml.safe_load((folder / "mine_tool.yaml").read_text().replace("!function ", ""))
    # every registered task metric (harness.common.metrics); the Brier score too, as every
    # item of the task has the same number of choices
    assert [m["metric"] for m in task["metric_list"]] == ["acc", "acc_norm", "brier_score"]
    assert task["metric_list"][2] == {
        "metric": "brier_score", "aggregation": "brier_score", "higher_is_better": False
    }
    text = (folder / "mine_tool.yaml").read_text()
    assert 'doc_to_text: "{{question}}\\nAnswer:"' in text and 'target_delimiter: " "' in text
    # unchanged content is not rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}
    assert write_task_folder(items, folder, prefix="mine")["written"] == []
    assert {p: p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()} == mtimes
    with pytest.raises(ValueError, match="task name 'a b' cannot name an lm-eval task file"):
        write_task_folder([{**items[0], "task": "a b"}], tmp_path / "bad")


# --------------------------------------------------------------------------- data step


def test_prepare_data_summary_and_stable_mtimes(tmp_path):
    cfg = {
        "source": "generated",
        "seed": 4,
        "tasks": ["animal", "color"],
        "train_per_task": 10,
        "test_per_task": 6,
    }
    out = tmp_path / "data"
    summary = prepare_data(cfg, out)
    assert json.loads((out / "data_summary.json").read_text()) == summary
    assert summary["source"] == "generated" and summary["seed"] == 4
    assert summary["train_counts"] == {"animal": 10, "color": 10}
    assert summary["test_counts"] == {"animal": 6, "color": 6}
    assert sorted(summary["label_histogram"]["train"]["animal"]) == [2, 2, 3, 3]
    assert summary["label_histogram"]["test"]["color"] == [
        sum(i["label"] == k for i in generate_suite(4, ["color"], 10, 6)["test"]) for k in range(4)
    ]
    assert (
        summary["sha256"]["train.jsonl"]
        == hashlib.sha256((out / "train.jsonl").read_bytes()).hexdigest()
    )
    assert (
        summary["sha256"]["tasks/data/color.jsonl"]
        == hashlib.sha256((out / "tasks" / "data" / "color.jsonl").read_bytes()).hexdigest()
    )
    suite = generate_suite(4, ["animal", "color"], 10, 6)
    assert load_jsonl(out / "train.jsonl") == suite["train"]

    # a rerun changes no file; the same config elsewhere gives identical bytes
    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert prepare_data(cfg, out) == summary
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    other = prepare_data(cfg, tmp_path / "other")
    assert (tmp_path / "other" / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    assert other["sha256"] == summary["sha256"]
    assert (
        prepare_data({**cfg, "seed": 5}, tmp_path / "seed5")["sha256"]["train.jsonl"]
        != summary["sha256"]["train.jsonl"]
    )

    # fewer tasks: the dropped task's files disappear from the folder
    smaller = prepare_data({**cfg, "tasks": ["animal"]}, out)
    assert smaller["tasks"] == ["moelora_animal"]
    assert not (out / "tasks" / "moelora_color.yaml").exists()
    assert not (out / "tasks" / "data" / "color.jsonl").exists()


def test_prepare_data_from_jsonl(tmp_path):
    def rows(task: str, n: int) -> list[str]:
        return [
            json.dumps(
                {"question": f"{task} q{i}", "choices": ["yes", "no"], "label": i % 2, "task": task}
            )
            for i in range(n)
        ]

    train = _write_lines(tmp_path / "train.jsonl", rows("alpha", 5) + rows("beta", 3))
    test = _write_lines(tmp_path / "test.jsonl", rows("beta", 2) + rows("alpha", 4))
    # seed / train_per_task / test_per_task are schema defaults: present, ignored
    cfg = {
        "source": "jsonl",
        "train": str(train),
        "test": str(test),
        "seed": 1234,
        "train_per_task": 256,
    }
    summary = prepare_data(cfg, tmp_path / "out")
    assert summary["seed"] is None
    assert summary["tasks"] == ["moelora_beta", "moelora_alpha"]
    assert summary["train_counts"] == {"alpha": 5, "beta": 3}
    assert summary["test_counts"] == {"beta": 2, "alpha": 4}
    assert summary["label_histogram"]["test"] == {"beta": [1, 1], "alpha": [2, 2]}
    loaded = _load_suite(tmp_path / "out" / "tasks")
    test_items = load_jsonl(test)
    _check_task_docs(
        loaded["tasks"]["moelora_alpha"], [i for i in test_items if i["task"] == "alpha"]
    )

    only_alpha = prepare_data({**cfg, "tasks": ["alpha"]}, tmp_path / "out2")
    assert only_alpha["train_counts"] == {"alpha": 5} and only_alpha["tasks"] == ["moelora_alpha"]
    with pytest.raises(ValueError, match=r"data\.tasks names 'gamma'"):
        prepare_data({**cfg, "tasks": ["gamma"]}, tmp_path / "out3")
    with pytest.raises(DataError, match=r"missing\.jsonl: file not found"):
        prepare_data({**cfg, "test": str(tmp_path / "missing.jsonl")}, tmp_path / "out4")


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"source": "ftp"}, "data.source must be one of: generated, jsonl, files, hub, lm_eval (got 'ftp')"),
        ({"seed": 1}, "missing key 'source' (valid: generated, jsonl, files, hub, lm_eval)"),
        ({"source": "jsonl", "test": "t.jsonl"}, "missing key 'train'"),
        (
            {"source": "generated", "shots": 3},
            "unknown data key 'shots' for source 'generated' (valid keys: source, seed, tasks, train_per_task, test_per_task)",
        ),
        (
            {"source": "generated", "tasks": ["nope"]},
            "unknown task 'nope' (valid tasks: animal, color",
        ),
    ],
)
def test_prepare_data_rejects_bad_configs(tmp_path, cfg, expected):
    with pytest.raises(ValueError) as err:
        prepare_data(cfg, tmp_path / "out")
    assert expected in str(err.value)
    assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
