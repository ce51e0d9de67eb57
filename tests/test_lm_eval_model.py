"""The ``moe-lora`` lm-eval model is lm-eval's own ``HFLM`` over a run's model: every request
type works through the harness's evaluation on the tiny model. A local generative task
(``generate_until``, exact match) and a perplexity task (``loglikelihood_rolling``) named in
``eval.tasks`` are scored for the base model and a trained routed run, and equal what lm-eval's
``hf`` model gives for the base model from the same checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.conftest import TINY_STUDY_MODEL

ROOT = Path(__file__).resolve().parents[1]

GENERATIVE = """\
task: tiny_echo
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Words: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 4
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

PERPLEXITY = """\
task: tiny_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    from harness.cli.main import main
    from harness.plan.study import plan_from_file

    folder = tmp_path_factory.mktemp("lmeval")
    tasks = folder / "tasks"
    tasks.mkdir()
    echo = [{"question": w, "answer": w} for w in ("red", "blue", "green", "cat", "dog", "tool")]
    (tasks / "echo.jsonl").write_text("".join(json.dumps(d) + "\n" for d in echo))
    # one of the documents (1,400 words) is longer than a 2,048-token window: several rolling
    # windows (HFLM's) are scored for it
    texts = [{"text": " ".join(["the red cat sees a blue dog"] * n)} for n in (3, 40, 200)]
    (tasks / "text.jsonl").write_text("".join(json.dumps(d) + "\n" for d in texts))
    (tasks / "tiny_echo.yaml").write_text(GENERATIVE.format(data=tasks / "echo.jsonl"))
    (tasks / "tiny_text.yaml").write_text(PERPLEXITY.format(data=tasks / "text.jsonl"))
    config = {
        "study": "lmeval",
        "out_dir": "out",
        "model": {**TINY_STUDY_MODEL, "tiny": {**TINY_STUDY_MODEL["tiny"], "vocab_size": 1024}},
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": ["lora", "sira"],
        "data": {"source": "generated", "tasks": ["animal", "color"], "train_per_task": 16, "test_per_task": 8},
        "train": {"seeds": [0], "steps": 3, "batch_size": 4},
        "eval": {"batch_size": 4, "tasks": ["tiny_echo", "tiny_text"], "include_path": str(tasks)},
    }
    path = folder / "study.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    mp = pytest.MonkeyPatch()
    mp.chdir(folder)
    try:
        _, plan = plan_from_file(str(path))
        assert main(["data", "--config", str(path)]) == 0
        (base,) = [r for r in plan.runs if r.is_base]
        sira = next(r for r in plan.trained_runs if r.method == "sira")
        assert main(["evaluate", "--config", str(path), "--run", base.run_id, "--quiet"]) == 0
        assert main(["train", "--config", str(path), "--run", sira.run_id, "--quiet"]) == 0
    finally:
        mp.undo()
    return folder, path, plan, base, sira, tasks


def _metrics(folder: Path, run) -> dict:
    return json.loads((folder / "out" / "runs" / run.run_id / "metrics.json").read_text())


def test_generative_and_perplexity_tasks_are_scored_for_every_run(study):
    folder, _, _, base, sira, _ = study
    for run in (base, sira):
        extra = _metrics(folder, run)["extra_tasks"]
        assert 0.0 <= extra["tiny_echo"]["exact_match,none"] <= 1.0
        text = extra["tiny_text"]
        assert text["word_perplexity,none"] > 1.0 and text["bits_per_byte,none"] > 0
    # training changed the model: its perplexity on the text is not the untrained model's
    assert _metrics(folder, sira)["extra_tasks"]["tiny_text"]["word_perplexity,none"] != pytest.approx(
        _metrics(folder, base)["extra_tasks"]["tiny_text"]["word_perplexity,none"], rel=1e-9)


def test_generation_and_rolling_scores_equal_lm_eval_hf_for_the_base_model(study):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from harness.model.load import cache_root, resolve_model
    from harness.plan.config import load_config

    folder, path, _, base, _, tasks = study
    config = load_config(path)
    config["cache_dir"] = str(folder / config["cache_dir"])
    source = resolve_model(config["model"], cache_root(config))
    reference = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={source.path},dtype=float32,device=cpu,max_length=2048",
        tasks=["tiny_echo", "tiny_text"],
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        batch_size=4,
        random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234,
        verbosity="WARNING",
    )["results"]
    ours = _metrics(folder, base)["extra_tasks"]
    assert ours["tiny_echo"]["exact_match,none"] == reference["tiny_echo"]["exact_match,none"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert ours["tiny_text"][metric] == pytest.approx(reference["tiny_text"][metric], rel=1e-5)


def test_batched_generation_equals_one_request_at_a_time(study):
    """HFLM batches generation requests by length (left padding); the same greedy answers come
    back as with a batch of one."""
    from lm_eval.api.instance import Instance

    from harness.model.lm_eval_model import HarnessLM

    folder, _, _, _, sira, _ = study
    run_dir = folder / "out" / "runs" / sira.run_id
    prompts = ["Words: red\nAnswer:", "Words: a much longer line of several words\nAnswer:", "Words: dog\nAnswer:"]

    def generate(batch_size: int) -> list[str]:
        lm = HarnessLM(run_dir=str(run_dir), batch_size=batch_size)
        requests = [
            Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": 5, "do_sample": False}), i)
            for i, p in enumerate(prompts)
        ]
        return lm.generate_until(requests, disable_tqdm=True)

    assert generate(3) == generate(1)


def test_extra_tasks_keep_per_item_values_and_every_prediction_is_stored(study):
    """Issue 32/33 on a real evaluation: the generative registry task's exact match is kept per
    item (its mean is lm-eval's number), the corpus perplexity has no per-item value,
    ``samples.json`` holds every item's prediction and is in the run's manifest (the summary
    and table columns built from these are tests/test_significance_metrics.py's)."""
    folder, _, _, base, sira, _ = study
    for run in (base, sira):
        metrics = _metrics(folder, run)
        bits = metrics["extra_items"]["tiny_echo"]["exact_match,none"]
        assert len(bits) == 6 and set(bits) <= {"0", "1"}
        assert sum(int(b) for b in bits) / 6 == pytest.approx(metrics["extra_tasks"]["tiny_echo"]["exact_match,none"])
        assert not metrics["extra_items"].get("tiny_text")  # perplexity: a corpus metric
        run_dir = folder / "out" / "runs" / run.run_id
        samples = json.loads((run_dir / "samples.json").read_text())
        echo = samples["extra_tasks"]["tiny_echo"]
        assert echo["output_type"] == "generate_until"
        assert [s["doc_id"] for s in echo["filters"]["none"]] == list(range(6))
        assert all({"target", "response"} <= set(s) for s in echo["filters"]["none"])
        suite = samples["tasks"]["animal"]["filters"]["none"]
        assert all(len(s["loglikelihoods"]) >= 2 and 0 <= s["gold"] < len(s["loglikelihoods"]) for s in suite)
        assert "samples.json" in json.loads((run_dir / "manifest.json").read_text())["files"]
