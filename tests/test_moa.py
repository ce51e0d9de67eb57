"""MoA (issue 9): two DAG stages through the generic component interface, matched budgets,
compose, router accuracy.

One tiny study (three tasks, T = 3 task adapters of rank r = 2, top-1) is trained once for
the module, in-process: stage one (one peft LoRA per task), stage two (the router), lm-eval
and the tables. The tests then check, each on real files or tensors:

* every stage-one adapter sees only its own task's items (batch by batch);
* with the router forced to adapter ``j`` the model equals task ``j``'s LoRA alone;
* composing without an adapter leaves every stage-one file bit-identical, and in the DAG
  dropping (or adding) a task reruns stage two alone (``snakemake -n``);
* the budget counts equal the real parameters: total = all task adapters (frozen, counted
  from their own folders) + router, activated = k adapters + router, router alone;
* compose refuses incompatible folders naming the folder and the field;
* router accuracy reaches ``metrics.json``, ``summary.csv`` and the main table.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.conftest import TINY_STUDY_MODEL as TINY

ROOT = Path(__file__).resolve().parent.parent

TASKS = ["color", "animal", "tool"]
TRAIN_PER_TASK = 8
TEST_PER_TASK = 4
# the 7 projections of one decoder layer (hidden 32, intermediate 64, 2 kv heads of dim 8)
SHAPES = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
SUM_IN_OUT = sum(i + o for i, o in SHAPES)  # 512
SUM_IN = sum(i for i, _ in SHAPES)  # 256


def study_dict(folder: Path, total_rank: int = 6, active_rank: int = 2, moa=None) -> dict:
    return {
        "study": "moa",
        "out_dir": str(folder / "out"),
        "cache_dir": str(folder / ".cache"),
        "model": TINY,
        "budget": {
            "total_rank": total_rank,
            "active_rank": active_rank,
            "granularities": [total_rank // active_rank],
            "alpha": 8,
        },
        "methods": [moa or "moa"],
        "data": {
            "source": "generated",
            "tasks": TASKS,
            "train_per_task": TRAIN_PER_TASK,
            "test_per_task": TEST_PER_TASK,
        },
        "train": {"seeds": [0], "steps": 6, "batch_size": 4, "lr": 0.02, "checkpoint_every": 0},
        "eval": {"include_base": False, "batch_size": 64},
    }


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Both stages, evaluation and tables of the tiny study, in-process.

    Returns a namespace with the folder, config path, config, plan, the MoA run and, per
    stage-one adapter name, the tasks of every training item its batches held."""
    from types import SimpleNamespace

    import harness.run.train as train_module
    from harness.analysis.summary import write_summary
    from harness.analysis.tables import collect_results, main_table, write_tables
    from harness.data.prepare import prepare_data
    from harness.model.run_folder import write_run_spec
    from harness.plan.config import load_config
    from harness.plan.study import plan_study
    from harness.run.evaluate import evaluate_run

    folder = tmp_path_factory.mktemp("moa")
    path = write_config(folder / "study.yaml", study_dict(folder))
    config = load_config(path)
    plan = plan_study(config)
    prepare_data(config["data"], plan.out_dir / "data")

    seen: dict[str, list[str]] = {}
    current = {"name": None}
    original = train_module.Batcher.__call__

    def spy(self, indices):
        seen.setdefault(current["name"], []).extend(self.examples[i].task for i in indices)
        return original(self, indices)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_module.Batcher, "__call__", spy)
        for adapter in plan.components:
            current["name"] = adapter.run_id
            write_run_spec(config, adapter, plan.run_dir(adapter))
            train_module.train_run(config, adapter, plan.run_dir(adapter), progress=False)
        (run,) = plan.trained_runs
        current["name"] = run.run_id
        run_dir = plan.run_dir(run)
        write_run_spec(config, run, run_dir)
        train_module.train_run(config, run, run_dir, progress=False)
    evaluate_run(config, run, run_dir, progress=False)
    write_summary(plan)
    write_tables(plan)
    results = collect_results(plan)
    return SimpleNamespace(
        folder=folder,
        path=path,
        config=config,
        plan=plan,
        run=run,
        run_dir=run_dir,
        seen=seen,
        table=main_table(results),
    )


def adapter_dir(study, task: str) -> Path:
    (adapter,) = [a for a in study.plan.components if a.tasks == [task]]
    return study.plan.out_dir / adapter.path


# -- planning: two stages ------------------------------------------------------------------


def test_plan_has_one_stage_one_job_per_task_and_one_router_run(study):
    from methods.moa.task_adapters import TASK_ADAPTER_DIR

    plan, run = study.plan, study.run
    assert [a.tasks for a in plan.components] == [[t] for t in TASKS]
    for adapter in plan.components:
        (task,) = adapter.tasks
        assert re.fullmatch(rf"{task}-r2-s0-[0-9a-f]{{8}}", adapter.run_id)
        assert adapter.path == f"{TASK_ADAPTER_DIR}/{adapter.run_id}"
        assert adapter.is_component and adapter.method == "lora"
        # ceil(train.steps / number of tasks in the data) = ceil(6 / 3)
        assert (adapter.method_config["rank"], adapter.steps, adapter.seed) == (2, 2, 0)
    assert (run.method, run.tag, run.granularity) == ("moa", "T3", 3)
    assert run.components == [a.path for a in plan.components]
    assert run.method_config["tasks"] == TASKS
    assert (run.method_config["expert_rank"], run.method_config["top_k"]) == (2, 1)
    assert run.method_config["router_steps"] == 2
    spec = json.loads((study.run_dir / "run.json").read_text())
    # stored relative to the run folder, so the study folder can move
    assert spec["components"] == [f"../../{a.path}" for a in plan.components]


def test_each_stage_one_adapter_sees_only_its_own_tasks_items(study):
    for adapter in study.plan.components:
        (task,) = adapter.tasks
        batches = study.seen[adapter.run_id]
        # 2 steps of batch 4, every item of this adapter's task only
        assert batches == [task] * 8, adapter.run_id
        summary = json.loads((study.plan.out_dir / adapter.path / "train.json").read_text())
        assert summary["example_tasks"] == {task: TRAIN_PER_TASK}
        assert summary["examples"] == TRAIN_PER_TASK and summary["steps"] == 2
        spec = json.loads((study.plan.out_dir / adapter.path / "run.json").read_text())
        assert spec["method"] == "lora" and spec["effective_config"]["task"] == task
    # stage two trains the router on the whole mixture
    router_batches = study.seen[study.run.run_id]
    assert len(router_batches) == 2 * 4 and set(router_batches) <= set(TASKS)
    train = json.loads((study.run_dir / "train.json").read_text())
    assert train["example_tasks"] == {t: TRAIN_PER_TASK for t in TASKS}


def test_select_examples_keeps_one_task_and_names_a_missing_one():
    from harness.run.train import Example, select_examples

    examples = [Example([1], [0], [1], task) for task in ("a", "b", "a", "c")]
    assert select_examples(examples, ["a"]) == [0, 2]
    assert select_examples(examples, None) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match=r"no training items of task\(s\) \['z'\].*\['a', 'b', 'c'\]"):
        select_examples(examples, ["a", "z"])


# -- forced router == that task's LoRA alone -------------------------------------------------


def test_router_forced_to_one_adapter_equals_that_tasks_lora_alone(study):
    from harness.model.run_folder import load_run_model
    from methods.moa import MoALayer

    moa = load_run_model(study.run_dir, device="cpu")
    layers = [m for m in moa.model.modules() if isinstance(m, MoALayer)]
    assert len(layers) == 7
    vocab = moa.model.get_input_embeddings().num_embeddings
    ids = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(0))
    outputs = []
    with torch.no_grad():
        for j, task in enumerate(TASKS):
            lora = load_run_model(adapter_dir(study, task), device="cpu")
            assert lora.handle.method.name == "lora"
            for m in layers:
                m.force_expert = j
            forced = moa.model(input_ids=ids).logits
            alone = lora.model(input_ids=ids).logits
            torch.testing.assert_close(forced, alone, rtol=0, atol=2e-5)
            outputs.append(forced)
        for m in layers:
            m.force_expert = None
    # not vacuous: the three task LoRAs are trained and differ from one another
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3
    assert (outputs[1] - outputs[2]).abs().max() > 1e-3


def test_forced_layer_equals_peft_lora_at_the_layer_and_routing_levels():
    from torch import nn

    from harness.adapters import TargetShape, get_method
    from harness.adapters.inject import apply_method

    torch.manual_seed(0)
    d_in, d_out, r, T = 12, 20, 3, 4
    moa = get_method("moa")
    holder = nn.Module()
    holder.linear = nn.Linear(d_in, d_out, bias=False)
    for level in ("sequence", "token"):
        cfg = moa.make_config(alpha=6.0, num_experts=T, expert_rank=r, top_k=1, level=level,
                              tasks=list("abcd"))
        holder.linear = getattr(holder.linear, "base_layer", holder.linear)
        apply_method(holder, moa, cfg, [TargetShape("linear", d_in, d_out)])
        layer = holder.linear
        with torch.no_grad():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape))
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape))
        x = torch.randn(2, 5, d_in)
        for j in range(T):
            layer.force_expert = j
            ref = layer.base_layer(x) + (6.0 / r) * x @ layer.lora_A[j * r:(j + 1) * r].T @ layer.lora_B[:, j * r:(j + 1) * r].T
            torch.testing.assert_close(layer(x), ref, rtol=0, atol=1e-5)
        layer.force_expert = None
        layer.record_routing = True
        layer.eval()
        layer(x)
        shares = layer.routing_shares.view(2, 5, T)  # the generic evaluation record
        torch.testing.assert_close(shares.sum(-1), torch.ones(2, 5))
        if level == "sequence":  # every token carries its sequence's one choice
            assert torch.equal(shares, shares[:, :1].expand_as(shares))
        layer.record_routing = False
        # sequence level: one adapter per sequence; token level: each token its own
        index = layer.route(x.reshape(-1, d_in), None).index.view(2, 5)
        if level == "sequence":
            assert (index == index[:, :1]).all()
        else:
            logits = layer.router(x.reshape(-1, d_in))
            assert torch.equal(index.reshape(-1), logits.argmax(-1))


def test_top1_router_uses_the_chosen_adapter_at_full_strength():
    from torch import nn

    from harness.adapters import BudgetError, TargetShape, get_method
    from harness.adapters.inject import apply_method

    torch.manual_seed(1)
    d_in, d_out, r, T = 10, 6, 2, 3
    moa = get_method("moa")
    holder = nn.Module()
    holder.linear = nn.Linear(d_in, d_out, bias=False)
    cfg = moa.make_config(alpha=4.0, num_experts=T, expert_rank=r, top_k=1, tasks=list("abc"))
    apply_method(holder, moa, cfg, [TargetShape("linear", d_in, d_out)])
    layer = holder.linear
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape))
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape))
    layer.eval()
    x = torch.randn(4, 5, d_in)
    chosen = layer.router(x.mean(1)).argmax(-1)
    expected = torch.stack([
        layer.base_layer(x[i]) + (4.0 / r) * x[i] @ layer.lora_A[j * r:(j + 1) * r].T
        @ layer.lora_B[:, j * r:(j + 1) * r].T
        for i, j in enumerate(chosen.tolist())
    ])
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-5)
    assert len(set(chosen.tolist())) > 1  # the check covers more than one adapter

    class Request:
        total_rank, active_rank, alpha, router = 6, 2, 4.0, "separate"

    with pytest.raises(BudgetError, match="needs router_supervision > 0"):
        moa.solve(Request(), None, [], {"tasks": list("abc"), "router_supervision": 0.0})


def test_router_supervision_is_cross_entropy_on_task_labels_shared_over_modules():
    import torch.nn.functional as F
    from torch import nn

    from harness.adapters import TargetShape, get_method
    from harness.adapters.inject import apply_method

    torch.manual_seed(0)
    moa = get_method("moa")
    holder = nn.Module()
    holder.a = nn.Linear(8, 8, bias=False)
    holder.b = nn.Linear(8, 8, bias=False)
    cfg = moa.make_config(alpha=2.0, num_experts=3, expert_rank=1, top_k=1, tasks=["x", "y", "z"],
                          router_supervision=0.5)
    handle = apply_method(holder, moa, cfg, [TargetShape("a", 8, 8), TargetShape("b", 8, 8)])
    x = torch.randn(2, 4, 8)
    holder.train()
    with handle.task_labels(["z", "x"]):
        holder.a(x)
        holder.b(x)
        aux = handle.aux_loss()
    expected = sum(
        0.5 * 0.5 * F.cross_entropy(m.router(x.mean(1)), torch.tensor([2, 0])) for m in (holder.a, holder.b)
    )
    torch.testing.assert_close(aux, expected)
    aux.backward()
    assert holder.a.router.weight.grad.abs().sum() > 0
    # no labels (evaluation): no auxiliary loss
    holder.a(x)
    assert handle.aux_loss() is None


# -- removing / adding adapters: bit-identical adapters, stage two only ---------------------


def test_composing_without_an_adapter_keeps_every_adapter_bit_identical(study, tmp_path):
    from safetensors.torch import load_file

    from harness.model.run_folder import load_run_model
    from harness.run.compose import compose
    from methods.moa import MoALayer

    stage_one = study.plan.out_dir / "task_adapters"
    before = digest(stage_one)
    kept = [adapter_dir(study, t) for t in ("color", "tool")]
    out = tmp_path / "moa-color-tool"
    summary = compose("moa", kept, out, {"router_steps": 3}, seed=0, progress=False)
    assert digest(stage_one) == before
    assert summary["steps"] == 3 and summary["example_tasks"] == {"color": 8, "tool": 8}
    # the new run stores only the routers; the task LoRAs stay in their folders
    spec = json.loads((out / "run.json").read_text())
    assert spec["method_config"]["tasks"] == ["color", "tool"]
    assert [Path(c).name for c in spec["components"]] == [k.name for k in kept]
    stored = load_file(str(out / "adapter" / "adapter.safetensors"))
    assert stored and all(".router." in k for k in stored)
    # and the composed model's blocks are the stage-one tensors, bit for bit
    loaded = load_run_model(out, device="cpu")
    for e, folder in enumerate(kept):
        state = load_file(str(folder / "adapter" / "adapter.safetensors"))
        for name, m in loaded.model.named_modules():
            if isinstance(m, MoALayer):
                assert torch.equal(m.lora_A[2 * e:2 * e + 2], state[f"{name}.lora_A.default.weight"])
                assert torch.equal(m.lora_B[:, 2 * e:2 * e + 2], state[f"{name}.lora_B.default.weight"])
    assert summary["params"]["trained_in_this_run"] == 2 * SUM_IN
    assert summary["params"]["trainable_numel"] == summary["params"]["total"] == 2 * 2 * SUM_IN_OUT + 2 * SUM_IN


def _dry_runs(config_paths: list[Path], cwd: Path) -> list[tuple[dict[str, int], str]]:
    """``snakemake -n`` for each config, side by side: per config, the job counts per rule
    (the dry run's "Job stats"; empty when there is nothing to do) and the whole output."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "snakemake", "-s", str(ROOT / "Snakefile"), "--directory",
             str(cwd), "-n", "--nolock", "--cores", "1", "--configfile", str(path)],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for path in config_paths
    ]
    out = []
    for proc in procs:
        text, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, text[-3000:]
        jobs: dict[str, int] = {}
        if "Job stats:" in text:
            for line in text.split("Job stats:", 1)[1].splitlines()[3:]:
                parts = line.split()
                if len(parts) != 2 or parts[0] == "total":
                    break
                jobs[parts[0]] = int(parts[1])
        out.append((jobs, text))
    return out


def test_dropping_or_adding_a_task_reruns_only_stage_two_in_the_dag(study):
    from harness.plan.config import load_config
    from harness.plan.study import plan_study

    names = {a.tasks[0]: a.run_id for a in study.plan.components}
    # drop `animal` (total_rank 6 -> 4 keeps the per-task rank 2): same adapter folders
    fewer = study_dict(study.folder, total_rank=4, moa={"name": "moa", "options": {"tasks": ["color", "tool"]}})
    fewer_path = write_config(study.folder / "fewer.yaml", fewer)
    fewer_plan = plan_study(load_config(fewer_path))
    assert [a.run_id for a in fewer_plan.components] == [names["color"], names["tool"]]
    (fewer_run,) = fewer_plan.trained_runs
    assert fewer_run.tag == "T2" and fewer_run.run_id != study.run.run_id
    # add `fruit` (total_rank 6 -> 8): one new stage-one job, the other three are reused
    more = study_dict(study.folder, total_rank=8)
    more["data"]["tasks"] = [*TASKS, "fruit"]
    # same per-task steps as before (the default follows the number of tasks in the data)
    more["methods"] = [{"name": "moa", "options": {"task_steps": 2}}]
    more_path = write_config(study.folder / "more.yaml", more)
    more_plan = plan_study(load_config(more_path))
    assert [a.run_id for a in more_plan.components][:3] == [names[t] for t in TASKS]
    new = more_plan.components[3]
    assert new.tasks == ["fruit"] and new.run_id not in names.values()

    # two dry runs side by side (each spends ~10 s of CPU importing and planning)
    (dropped, dropped_text), (added, added_text) = _dry_runs([fewer_path, more_path], study.folder)
    # dropping a task: stage two (trained, then scored) only; the three stage-one folders
    # and the data, all written in-process before, are up to date
    assert "train_component" not in dropped and "data" not in dropped, dropped_text
    assert dropped["train"] == 1 and dropped["evaluate"] == 1
    assert f"run={fewer_run.run_id}" in dropped_text
    # adding one: that task's stage-one job, then stage two (the data changed too)
    assert added["train_component"] == 1 and f"component=task_adapters/{new.run_id}" in added_text, added_text
    assert added["train"] == 1
    for name in names.values():
        assert f"component=task_adapters/{name}" not in added_text


# -- budgets ----------------------------------------------------------------------------------


def test_budget_counts_equal_the_real_parameters_of_both_stages(study):
    from harness.adapters.inject import trainable_numel
    from harness.model.run_folder import load_run_model
    from harness.plan.budget import lora_count

    T, r, k = 3, 2, 1
    total = T * r * SUM_IN_OUT + T * SUM_IN
    activated = k * r * SUM_IN_OUT + T * SUM_IN
    router = T * SUM_IN
    assert (total, activated, router) == (3840, 1792, 768)
    (row,) = study.plan.rows
    assert (row.counts.total, row.counts.activated, row.counts.router) == (total, activated, router)
    assert row.verified_total in (None, total)
    # router: separate -> the adapters match LoRA rank R (total) and rank K (activated)
    assert total - router == lora_count(6, study.plan.shapes) == 6 * SUM_IN_OUT
    assert activated - router == lora_count(2, study.plan.shapes)

    params = json.loads((study.run_dir / "train.json").read_text())["params"]
    assert (params["total"], params["activated"], params["router"]) == (total, activated, router)
    assert params["trainable_numel"] == total
    assert params["trained_in_this_run"] == router
    # the frozen part is exactly what the task adapters trained, read from their folders
    stage_one = [
        json.loads((study.plan.out_dir / a.path / "train.json").read_text())["params"]
        for a in study.plan.components
    ]
    assert [p["trainable_numel"] for p in stage_one] == [r * SUM_IN_OUT] * T
    assert sum(p["trainable_numel"] for p in stage_one) + router == total
    # and the rebuilt model holds them: frozen + trainable == total
    loaded = load_run_model(study.run_dir, device="cpu")
    assert trainable_numel(loaded.model) == router
    assert sum(p.numel() for p in loaded.handle.frozen) == T * r * SUM_IN_OUT
    assert loaded.handle.adapter_numel() == loaded.handle.analytic_count().total == total


def test_solver_picks_the_per_task_rank_or_says_why_not():
    from harness.adapters import BudgetError, TargetShape, get_method
    from harness.plan.budget import BudgetRequest

    moa = get_method("moa")
    shapes = [TargetShape("q", 32, 32), TargetShape("down", 64, 32)]
    opts = {"tasks": ["a", "b", "c", "d"]}
    cfg = moa.solve(BudgetRequest(8, 4, (4,)), moa.variants(BudgetRequest(8, 4, (4,)), opts)[0], shapes, opts)
    assert (cfg.num_experts, cfg.expert_rank, cfg.top_k) == (4, 2, 2)
    # R not divisible by T
    request = BudgetRequest(6, 3, (2,))
    with pytest.raises(BudgetError, match=r"total_rank/T = 6/4 = 1\.5 is not a whole number.*multiples of 4"):
        moa.solve(request, moa.variants(request, opts)[0], shapes, opts)
    # K not a whole number of adapters
    opts3 = {"tasks": ["a", "b", "c"]}
    request = BudgetRequest(6, 3, (2,))
    with pytest.raises(BudgetError, match=r"active_rank/r = 3/2 = 1\.5.*feasible active ranks for R=6, T=3: \[2, 4, 6\]"):
        moa.solve(request, moa.variants(request, opts3)[0], shapes, opts3)
    # no task list: the variant cannot be planned
    with pytest.raises(BudgetError, match="depends on the task list"):
        moa.variants(request)
    # router: counted shrinks the per-task rank until adapters + router fit the total
    # (LoRA rank 8: 8 * 160 = 1280; rank 2: 4*2*160 + 4*96 = 1664, +30%; rank 1: 1024, -20%)
    counted = BudgetRequest(8, 4, (4,), router="counted", tolerance=0.25)
    cfg = moa.solve(counted, moa.variants(counted, opts)[0], shapes, opts)
    assert (cfg.num_experts, cfg.expert_rank, cfg.top_k) == (4, 1, 2)
    assert moa.count_model(cfg, shapes).total == 1024
    counted = BudgetRequest(8, 4, (4,), router="counted", tolerance=0.1)
    with pytest.raises(BudgetError, match=r"closest: rank 1, 20\.0% off.*Raise budget\.tolerance to at least 20\.0%"):
        moa.solve(counted, moa.variants(counted, opts)[0], shapes, opts)


def test_bad_moa_options_name_the_option(tmp_path):
    from harness.adapters import OptionError, get_method
    from harness.plan.config import load_config
    from harness.plan.study import plan_study

    bad = study_dict(tmp_path, moa={"name": "moa", "options": {"tasks": ["color", "nope"]}})
    with pytest.raises(OptionError, match=r"moa option tasks = \['color', 'nope'\]: \['nope'\] not in the training data"):
        plan_study(load_config(write_config(tmp_path / "a.yaml", bad)))
    moa = get_method("moa")
    with pytest.raises(ValueError, match="moa option level = 'layer'; valid: sequence, token"):
        moa.make_config(level="layer")
    with pytest.raises(ValueError, match="moa option router_steps = 0"):
        moa.make_config(router_steps=0)


# -- compose refuses what cannot be stacked ---------------------------------------------------


def _copy(study, task: str, tmp_path: Path, name: str) -> Path:
    dest = tmp_path / name
    shutil.copytree(adapter_dir(study, task), dest)
    return dest


def _edit(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("field", "edit"),
    [
        ("rank", lambda d: _edit(d / "adapter" / "adapter.json", lambda a: a["config"].update(rank=4))),
        ("alpha", lambda d: _edit(d / "adapter" / "adapter.json", lambda a: a["config"].update(alpha=1.0))),
        ("targets", lambda d: _edit(d / "adapter" / "adapter.json", lambda a: a.update(targets=a["targets"][:3]))),
        (
            "model",
            lambda d: _edit(
                d / "run.json", lambda s: s["effective_config"]["model"].update(adapt_layers={"top": 2})
            ),
        ),
    ],
)
def test_compose_refuses_incompatible_folders_naming_folder_and_field(study, tmp_path, field, edit):
    from harness.adapters import ComponentError
    from harness.run.compose import compose

    odd = _copy(study, "tool", tmp_path, "odd")
    edit(odd)
    with pytest.raises(ComponentError, match=rf"{re.escape(str(odd.resolve()))}: field '{field}'"):
        compose("moa", [adapter_dir(study, "color"), odd], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_compose_refuses_duplicates_missing_files_and_non_lora_folders(study, tmp_path, capsys):
    from harness.cli.main import main

    first = adapter_dir(study, "color")
    twin = _copy(study, "color", tmp_path, "twin")
    code = main(["compose", "--method", "moa", "--components", str(first), str(twin), "--out", str(tmp_path / "o1"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and f"{twin}: field 'task' is 'color', the same as {first}" in err

    broken = _copy(study, "tool", tmp_path, "broken")
    (broken / "adapter" / "adapter.safetensors").unlink()
    code = main(["compose", "--method", "moa", "--components", str(first), str(broken), "--out", str(tmp_path / "o2")])
    err = capsys.readouterr().err
    assert code == 2 and "adapter/adapter.safetensors is missing" in err and str(broken) in err

    other = _copy(study, "tool", tmp_path, "other")
    _edit(other / "adapter" / "adapter.json", lambda a: a.update(method="smora"))
    code = main(["compose", "--method", "moa", "--components", str(first), str(other), "--out", str(tmp_path / "o3")])
    err = capsys.readouterr().err
    assert code == 2 and f"{other}: field 'method' is 'smora'" in err

    code = main(["compose", "--method", "moa", "--components", str(first), "--option", "top_k=2", "--out", str(tmp_path / "o4")])
    assert code == 2 and "moa option top_k = 2; valid: 1 to the 1 adapters" in capsys.readouterr().err
    assert not any((tmp_path / f"o{i}").exists() for i in range(1, 5))


def test_run_loading_refuses_adapters_in_the_wrong_order(study):
    from harness.adapters import ComponentError
    from harness.model.run_folder import load_run_model

    spec_path = study.run_dir / "run.json"
    original = spec_path.read_text()
    spec = json.loads(original)
    spec["components"] = spec["components"][::-1]
    spec_path.write_text(json.dumps(spec))
    try:
        with pytest.raises(ComponentError, match=r"field 'task' is \"tool\", but this model's block 0 needs \"color\""):
            load_run_model(study.run_dir, device="cpu")
    finally:
        spec_path.write_text(original)


# -- evaluation: router accuracy beside the scores --------------------------------------------


def test_router_accuracy_and_both_stages_time_in_metrics_summary_and_main_table(study):
    metrics = json.loads((study.run_dir / "metrics.json").read_text())
    acc = metrics["method_metrics"]["router_accuracy"]
    by_task = metrics["method_metrics"]["router_accuracy_by_task"]
    assert 0 <= acc <= 1 and sorted(by_task) == sorted(TASKS)
    # every task has the same number of test items: the mean of the per-task accuracies
    assert acc == pytest.approx(sum(by_task.values()) / 3, abs=1e-5)
    assert set(metrics["tasks"]) == set(TASKS) and 0 <= metrics["suite_acc"] <= 1

    summary = pd.read_csv(study.plan.out_dir / "summary.csv")
    (row,) = summary.to_dict("records")
    assert row["router_accuracy"] == pytest.approx(acc)
    assert list(summary.columns).index("router_accuracy") == list(summary.columns).index("suite_acc") + 1

    table = study.table.set_index("method")
    assert table.loc["moa", "metric:router_accuracy"] == pytest.approx(100 * acc)
    # the training time shown is both stages': the task adapters' jobs plus the router's
    wall = [
        json.loads((folder / "train.json").read_text())["timing"]["train_s"]
        for folder in [study.run_dir, *(study.plan.out_dir / a.path for a in study.plan.components)]
    ]
    assert table.loc["moa", "train_s"] == pytest.approx(sum(wall))
    assert row["train_s"] == pytest.approx(sum(wall))
    tables = study.plan.out_dir / "tables"
    csv = pd.read_csv(tables / "main_table.csv").set_index("method")
    assert csv.loc["moa", "metric:router_accuracy"] == pytest.approx(100 * acc)
    md = (tables / "main_table.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| method"))
    # the first table (the second one lists lm-eval's acc and acc_norm per task)
    moa_line = next(line for line in md.splitlines() if line.startswith("| MoA T3"))
    cells = [c.strip() for c in moa_line.strip("|").split("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert cells[columns.index("router accuracy")] == f"{100 * acc:.1f}"
    assert "router accuracy" in (tables / "main_table.tex").read_text()


def test_router_accuracy_counts_the_adapter_the_router_picks(study):
    """Through the generic evaluation record: lm-eval scores the held-out tasks while every
    MoA layer's per-token shares are gathered per task; MoA reads its accuracy from them."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from harness.model.lm_eval_model import HarnessLM
    from harness.run.evaluate import SUITE_GROUP, SUITE_PREFIX
    from methods.moa import MoALayer

    lm = HarnessLM(run_dir=str(study.run_dir), device="cpu")
    lm.record_routing = True
    # a zero router scores every adapter alike: top-1 picks adapter 0 for every prompt, so
    # it is right on exactly adapter 0's task
    for m in lm.model.modules():
        if isinstance(m, MoALayer):
            with torch.no_grad():
                m.router.weight.zero_()
    lm_eval.simple_evaluate(
        model=lm, tasks=[SUITE_GROUP], verbosity="ERROR",
        task_manager=TaskManager(include_path=str(study.plan.out_dir / "data" / "tasks"), include_defaults=False),
    )
    record = lm.routing_record()
    # every scored sequence counts once (with multi-token answers, one per choice)
    assert sorted(record.sequences) == sorted(f"{SUITE_PREFIX}_{t}" for t in TASKS)
    assert all(n >= TEST_PER_TASK for n in record.sequences.values())
    assert len(record.shares) == 7  # every adapted module
    for by_task in record.shares.values():
        for shares in by_task.values():
            assert shares == [1.0, 0.0, 0.0]
    from harness.adapters.routing import RoutingRecord

    renamed = RoutingRecord(
        shares={m: {t.removeprefix(f"{SUITE_PREFIX}_"): v for t, v in b.items()} for m, b in record.shares.items()},
        sequences={t.removeprefix(f"{SUITE_PREFIX}_"): n for t, n in record.sequences.items()},
    )
    method, config = lm.run.handle.method, lm.run.handle.config
    result = method.evaluation_metrics(config, renamed)
    assert result["router_accuracy_by_task"] == {"color": 1.0, "animal": 0.0, "tool": 0.0}
    assert result["router_accuracy"] == pytest.approx(1 / 3, abs=1e-6)
    # the labels follow the router's task order; tasks without an adapter (here `animal`,
    # once the router's task list names only two) are left out
    config.tasks = ["tool", "color"]
    result = method.evaluation_metrics(config, renamed)
    assert result["router_accuracy_by_task"] == {"tool": 1.0, "color": 0.0}
    assert result["router_accuracy"] == pytest.approx(0.5, abs=1e-6)
    # one expert takes everything: one effective expert
    assert renamed.effective_experts() == pytest.approx(1.0)
