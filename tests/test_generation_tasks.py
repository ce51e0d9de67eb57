"""Generation tasks (an item whose answer is a string): trained with the loss on the answer's
tokens, scored by lm-eval ``generate_until`` with its built-in ``exact_match`` from a task YAML
with no ``!function``; ``check`` knows them; metrics.json keeps exact_match per item; the
committed generation study's config and data are what its SOURCES.md says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.data.generation import validate_generation_item
from harness.data.jsonl import DataError
from harness.data.prepare import prepare_data
from harness.data.prompts import build_prompt, training_texts
from harness.data.sources import read_items
from harness.model.tokens import encode_pair
from harness.plan.checks import check_data
from harness.plan.config import load_config, validate_config
from harness.plan.study import plan_study
from harness.run.train import build_examples
from tests.conftest import TINY_STUDY_MODEL

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["cat", "dog", "sun", "tree", "book", "milk", "rain", "fish"]


def _write_data(folder: Path) -> tuple[Path, Path]:
    rows = [{"prompt": f"Reverse: {w}", "target": w[::-1], "kind": "rev"} for w in WORDS]
    rows += [{"prompt": f"Is {w} short?", "options": json.dumps(["yes", "no"]), "gold": ["no", "yes"][len(w) == 3],
              "kind": "yn"} for w in WORDS]
    train, test = folder / "train.csv", folder / "test.csv"
    pd.DataFrame(rows).to_csv(train, index=False)
    pd.DataFrame(rows[:4] + rows[8:12]).to_csv(test, index=False)
    return train, test


def _config(tmp_path: Path) -> dict:
    train, test = _write_data(tmp_path)
    return validate_config({
        "study": "gen", "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / ".cache"),
        "model": {**TINY_STUDY_MODEL, "device": "cpu"},
        "data": {"source": "files", "train": str(train), "test": str(test),
                 "fields": {"question": "prompt", "choices": "options", "label": "gold", "answer": "target",
                            "task": "kind"}},
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": ["lora"],
        "train": {"seeds": [0], "steps": 3, "batch_size": 4, "checkpoint_every": 0},
        "eval": {"include_base": False},
    })


def test_training_sees_the_prompt_and_learns_the_answer_and_its_stop_only():
    from transformers import AutoTokenizer

    from harness.model.load import resolve_model

    item = {"question": "Reverse: cat", "answer": "tac", "task": "rev"}
    assert training_texts(item) == (build_prompt(item), " tac\n")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(TINY_STUDY_MODEL, Path(".cache")).path)
    context, answer = encode_pair(tokenizer, *training_texts(item))
    (example,), truncated = build_examples(tokenizer, [item], "auto")
    assert truncated == 0 and example.ids == context + answer
    # the loss positions predict exactly the answer's tokens (and the newline), none of the prompt
    assert example.targets == answer
    assert example.positions == list(range(len(context) - 1, len(context) + len(answer) - 1))
    assert tokenizer.decode(answer) == " tac\n"


def test_generation_items_are_checked():
    with pytest.raises(ValueError, match="answer of a generation item must be a non-empty string, got an empty string"):
        validate_generation_item({"question": "q", "answer": ""})
    with pytest.raises(ValueError, match=r"answer 'a\\nb' holds '\\n', where generation stops"):
        validate_generation_item({"question": "q", "answer": "a\nb"})


def test_a_bad_generation_row_names_its_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "q", "answer": "ok"}\n{"question": "q2", "answer": "two\\nlines"}\n')
    with pytest.raises(DataError, match=rf"^{path}:2: answer 'two\\nlines' holds"):
        read_items({"source": "files", "train": str(path), "test": str(path)}, "test")


def test_the_task_yaml_loads_through_the_installed_loader_and_builds_the_training_prompt(tmp_path):
    from lm_eval.tasks import TaskManager, get_task_dict

    config = _config(tmp_path)
    summary = prepare_data(config["data"], tmp_path / "out" / "data")
    assert summary["primary_metric"] == {"rev": "exact_match", "yn": "acc"}
    assert summary["chance"] == {"yn": 0.5} and set(summary["label_histogram"]["test"]) == {"yn"}
    folder = tmp_path / "out" / "data" / "tasks"
    text = (folder / "moelora_rev.yaml").read_text()
    # the only code it names is the installed harness's loader; the data path is the folder's own
    assert "!function harness.data.lm_eval_tasks.load_docs" in text and "file: data/rev.jsonl" in text
    spec = yaml.load(text.replace("!function ", ""), Loader=yaml.SafeLoader)
    assert spec["output_type"] == "generate_until"
    assert spec["generation_kwargs"] == {"until": ["\n"], "max_gen_toks": len(" eert\n"), "do_sample": False}
    assert spec["metric_list"][0]["metric"] == "exact_match"
    task = get_task_dict(["moelora_rev"], TaskManager(include_path=str(folder), include_defaults=False))["moelora_rev"]
    docs = list(task.test_docs())
    assert [d["answer"] for d in docs] == ["tac", "god", "nus", "eert"]
    request = task.construct_requests(doc=docs[0], ctx=task.fewshot_context(docs[0], 0), metadata=("rev", 0, 1))
    assert request.arguments[0] == build_prompt({"question": "Reverse: cat"}) == training_texts(
        {"question": "Reverse: cat", "answer": "tac"})[0]
    # exact match after stripping the space the model's continuation starts with
    assert task.process_results(docs[0], [" tac"]) == {"exact_match": 1.0}
    assert task.process_results(docs[0], [" ta"]) == {"exact_match": 0.0}


def test_check_trains_and_scores_a_generation_task_end_to_end(tmp_path):
    from harness.model.run_folder import write_run_spec
    from harness.run.evaluate import evaluate_run
    from harness.run.train import train_run

    config = _config(tmp_path)
    assert check_data(config).endswith("tasks rev, yn (generation, scored by exact match: rev)")
    prepare_data(config["data"], Path(config["out_dir"]) / "data")
    plan = plan_study(config)
    run = next(r for r in plan.trained_runs if r.tag == "r4")
    run_dir = plan.run_dir(run)
    write_run_spec(config, run, run_dir)
    summary = train_run(config, run, run_dir, progress=False)
    assert summary["final_loss"] == summary["final_loss"]
    metrics = evaluate_run(config, run, run_dir, progress=False)
    stored = json.loads((run_dir / "metrics.json").read_text())
    assert stored["tasks"]["rev"]["primary"] == "exact_match"
    bits = stored["items"]["rev"]["exact_match"]
    assert isinstance(bits, str) and len(bits) == 4 and set(bits) <= {"0", "1"}
    assert stored["tasks"]["rev"]["score"] == stored["tasks"]["rev"]["exact_match"] == bits.count("1") / 4
    assert stored["tasks"]["yn"]["primary"] == "acc" and len(stored["items"]["yn"]["acc"]) == 4
    assert metrics["suite_acc"] == pytest.approx((stored["tasks"]["rev"]["score"] + stored["tasks"]["yn"]["score"]) / 2)


def test_the_committed_generation_study_reads_its_csv_data_as_sources_md_says():
    sources = (ROOT / "data" / "generation" / "SOURCES.md").read_text()
    for name in ("train.csv", "test.csv"):
        assert hashlib.sha256((ROOT / "data" / "generation" / name).read_bytes()).hexdigest() in sources
    config = load_config(ROOT / "config" / "generation.yaml")
    data = {**config["data"], **{k: str(ROOT / config["data"][k]) for k in ("train", "test")}}
    train, test = read_items(data, "train"), read_items(data, "test")
    counts = {}
    for _, item in train:
        counts[item["task"]] = counts.get(item["task"], 0) + 1
    assert counts == {"number_words": 150, "reverse_words": 150, "parity": 150} and len(test) == 150
    assert {"question": "Write 47 in words.", "answer": "forty-seven", "task": "number_words"} in [
        it for _, it in train + test]
    assert all(it["label"] == ["yes", "no"].index("yes" if int(it["question"].split()[1]) % 2 == 0 else "no")
               for _, it in test if it["task"] == "parity")
    # no test item is a training item
    assert not {it["question"] for _, it in train} & {it["question"] for _, it in test}
