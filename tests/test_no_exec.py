"""Nothing in a results folder is executed or unpickled (issue 31, point 1).

A results folder is shared, downloaded and rerun by people who did not write it. Each test plants
what an attacker (or an accident) would put there — a pickle whose unpickling writes a marker
file, a ``.py`` file next to the task YAMLs that writes a marker when imported, a plugin module
named by ``run.json`` that writes a marker when imported — and checks that reading the folder
refuses it with a message naming the file, and that the marker never appears.
"""

from __future__ import annotations

import json
import pickle
import random
import shutil
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from lm_eval.tasks import TaskManager

from harness.adapters import PluginError, TargetShape, apply_method, get_method, registry
from harness.common.state_files import STATE_JSON, TENSORS, load_state, save_state
from harness.data.lm_eval_tasks import TaskFolderError, verify_task_folder, write_task_folder
from harness.model.run_folder import import_run_plugins, load_run_model
from harness.run.identity import suite_scores
from harness.run.train import (
    CheckpointError,
    _load_checkpoint,
    _save_checkpoint,
    make_scheduler,
    resume_or_start,
    seed_everything,
)

ROOT = Path(__file__).resolve().parents[1]


class _WritesMarker:
    """Unpickling this object calls ``open(marker, "w")``: the file appears iff it was unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"step": 5, "payload": _WritesMarker(marker)})


# -- checkpoints -----------------------------------------------------------------------------


def test_an_old_pickled_checkpoint_is_refused_and_never_unpickled(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    last = run_dir / "checkpoints" / "last"
    last.mkdir(parents=True)
    (last / "state.pt").write_bytes(_evil_pickle(marker))
    (last / "train_log.jsonl").write_text("")
    with pytest.raises(CheckpointError) as info:
        resume_or_start(run_dir, None, None, None)  # refused before anything is restored
    message = str(info.value)
    assert str(last / "state.pt") in message
    assert "old-format (pickled) checkpoint" in message
    assert f"Delete the folder {last} and rerun" in message and "restarts from step 0" in message
    assert not marker.exists()


@pytest.mark.parametrize("planted", [STATE_JSON, TENSORS])
def test_a_pickle_in_place_of_a_state_file_is_refused_naming_it(tmp_path, planted):
    run_dir, marker = tmp_path / "run", tmp_path / "marker"
    last = run_dir / "checkpoints" / "last"
    save_state(last, {"step": 3, "adapter": {"w": torch.ones(2)}})
    (last / planted).write_bytes(_evil_pickle(marker))
    with pytest.raises(CheckpointError) as info:
        _load_checkpoint(last, None, None, None)
    assert f"cannot resume from {last}: {last / planted} is not a" in str(info.value)
    assert "Delete that folder and rerun" in str(info.value)
    assert not marker.exists()


def _holder(seed: int):
    torch.manual_seed(seed)
    holder = torch.nn.Module()
    holder.linear = torch.nn.Linear(8, 8, bias=False)
    method = get_method("smora")  # routed, with a load-balancing bias updated outside autograd
    handle = apply_method(holder, method, method.make_config(num_experts=4, expert_rank=1, top_k=2),
                          [TargetShape("linear", 8, 8)])
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2, weight_decay=0.01)
    scheduler = make_scheduler(optimizer, {"schedule": "cosine"}, n_steps=20, n_warmup=2)
    return holder, handle, optimizer, scheduler


def _steps(holder, handle, optimizer, scheduler, n: int) -> list:
    """``n`` optimizer steps on random inputs (drawn from every RNG the state saves), returning
    each step's loss, lr and the random draws, then the final adapter state."""
    out = []
    for _ in range(n):
        x = torch.randn(3, 5, 8) + float(np.random.rand()) + random.random()
        with handle.token_mask(None):
            loss = holder.linear(x).pow(2).mean()
            aux = handle.aux_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        handle.after_optimizer_step()
        out.append((loss.item(), scheduler.get_last_lr()[0]))
    return [*out, {k: v.clone() for k, v in handle.adapter_state_dict().items()}]


def test_a_checkpoint_resumes_bit_for_bit_from_safetensors_and_json(tmp_path):
    seed_everything(7)
    holder, handle, optimizer, scheduler = _holder(0)
    _steps(holder, handle, optimizer, scheduler, 3)
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 0}\n')
    last = tmp_path / "checkpoints" / "last"
    _save_checkpoint(last, handle, optimizer, scheduler, 3, log)
    assert sorted(p.name for p in last.iterdir()) == sorted([STATE_JSON, TENSORS, "train_log.jsonl"])
    uninterrupted = _steps(holder, handle, optimizer, scheduler, 4)

    seed_everything(99)  # other RNG states and other adapter weights: all must come from the files
    holder2, handle2, optimizer2, scheduler2 = _holder(0)  # the same frozen base weights, as a rerun's
    with torch.no_grad():
        for p in handle2.trainable_parameters():
            p.add_(torch.randn_like(p))
    assert _load_checkpoint(last, handle2, optimizer2, scheduler2) == 3
    resumed = _steps(holder2, handle2, optimizer2, scheduler2, 4)
    assert resumed[:-1] == uninterrupted[:-1]  # losses and learning rates, exactly
    assert resumed[-1].keys() == uninterrupted[-1].keys()
    for key, value in uninterrupted[-1].items():
        assert torch.equal(resumed[-1][key], value), key


def test_the_state_files_keep_types_and_values_exactly(tmp_path):
    state = {
        "ints": {0: (1, 2.5, None), "n": [True, "s", float("inf")]},
        "bf16": torch.tensor([1.5, -2.25], dtype=torch.bfloat16),
        "scalar": torch.tensor(3, dtype=torch.int64),
        "numpy": np.random.RandomState(3).get_state(),
        "python": random.Random(4).getstate(),
    }
    save_state(tmp_path, state)
    back = load_state(tmp_path)
    assert back["ints"] == {0: (1, 2.5, None), "n": [True, "s", float("inf")]}
    assert back["bf16"].dtype == torch.bfloat16 and torch.equal(back["bf16"], state["bf16"])
    assert back["scalar"].shape == () and back["scalar"].item() == 3
    assert back["numpy"][0] == "MT19937" and np.array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == np.uint32 and back["numpy"][2:] == state["numpy"][2:]
    assert random.Random().setstate(back["python"]) is None and back["python"] == state["python"]
    with pytest.raises(TypeError, match=r"state value at \.f is a function"):
        save_state(tmp_path / "x", {"f": lambda: 0})


# -- task folders ----------------------------------------------------------------------------


ITEMS = [
    {"question": f"Is {w} red?", "choices": ["no", "yes"], "label": i % 2, "task": t}
    for i, (w, t) in enumerate([("a", "one"), ("b", "one"), ("c", "one"), ("d", "two"), ("e", "two")])
]


def _study(tmp_path: Path) -> dict:
    """A study's data folder with the task folder the data step writes; the config
    ``suite_scores`` needs to score it."""
    data = tmp_path / "out" / "data"
    info = write_task_folder(ITEMS, data / "tasks")
    (data / "data_summary.json").write_text(json.dumps({"group": info["group"], "tasks": info["tasks"]}))
    return {"out_dir": str(tmp_path / "out"), "eval": {"batch_size": 4, "limit": None}}


def _marker_code(marker: Path) -> str:
    return f"open({str(marker)!r}, 'w').write('ran')\n\ndef load(**kwargs):\n    raise SystemExit\n"


def test_the_task_folder_holds_data_only_and_loads_from_anywhere(tmp_path):
    _study(tmp_path)
    folder = tmp_path / "out" / "data" / "tasks"
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) == [
        "data/one.jsonl", "data/two.jsonl", "moelora_one.yaml", "moelora_suite.yaml", "moelora_two.yaml"]
    assert "custom_dataset: !function harness.data.lm_eval_tasks.load_docs\n" in (folder / "moelora_one.yaml").read_text()
    verify_task_folder(folder)
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "tasks")  # relocatable: paths resolve per YAML
    shutil.rmtree(folder)
    tasks = TaskManager(include_path=str(moved), include_defaults=False).load(["moelora_suite"])["tasks"]
    assert [dict(d) for d in tasks["moelora_one"].test_docs()] == ITEMS[:3]
    assert [dict(d) for d in tasks["moelora_two"].test_docs()] == ITEMS[3:]


def test_an_old_folder_is_rewritten_without_its_loader(tmp_path):
    folder = tmp_path / "tasks"
    folder.mkdir()
    (folder / "suite_data.py").write_text("# the loader of earlier versions\n")
    (folder / "__pycache__").mkdir()
    (folder / "__pycache__" / "suite_data.cpython-311.pyc").write_bytes(b"")
    write_task_folder(ITEMS, folder)
    assert not (folder / "suite_data.py").exists() and not (folder / "__pycache__").exists()
    verify_task_folder(folder)


@pytest.mark.parametrize("plant", ["suite_data.py", "harness/data/lm_eval_tasks.py"])
def test_a_python_file_planted_in_the_task_folder_is_never_run_at_scoring(tmp_path, plant):
    """``suite_data.py``: the loader earlier versions wrote (and their YAMLs imported);
    ``harness/data/lm_eval_tasks.py``: where lm-eval looks first for the module the YAMLs name."""
    config, marker = _study(tmp_path), tmp_path / "marker"
    planted = tmp_path / "out" / "data" / "tasks" / plant
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text(_marker_code(marker))
    with pytest.raises(TaskFolderError) as info:
        suite_scores(config, "dummy", None, 4)  # the harness's scoring of a study's task folder
    assert f"{planted}: a task folder holds no code" in str(info.value)
    assert "rerun the data step" in str(info.value)
    assert not marker.exists()


def test_a_task_yaml_naming_other_code_is_refused(tmp_path):
    config, marker = _study(tmp_path), tmp_path / "marker"
    yaml_path = tmp_path / "out" / "data" / "tasks" / "moelora_one.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("harness.data.lm_eval_tasks.load_docs", "os.system"))
    with pytest.raises(TaskFolderError) as info:
        suite_scores(config, "dummy", None, 4)
    assert f"{yaml_path}: names !function os.system" in str(info.value)
    yaml_path.write_text(f"include: {tmp_path / 'other.yaml'}\ntask: moelora_one\n")
    with pytest.raises(TaskFolderError, match=r"moelora_one\.yaml: includes .*other\.yaml"):
        suite_scores(config, "dummy", None, 4)
    assert not marker.exists()


def test_a_clean_task_folder_is_scored(tmp_path):
    scores = suite_scores(_study(tmp_path), "dummy", None, 4)
    assert sorted(scores) == ["one", "two"] and {"acc", "acc_norm"} <= set(scores["one"])


# -- plugins named by run.json ---------------------------------------------------------------


@pytest.fixture
def planted_plugin(tmp_path, monkeypatch):
    """A run folder whose ``run.json`` names a plugin module that writes a marker when
    imported (and registers a method, as a real plugin would); the registry and ``sys.modules``
    are restored afterwards."""
    module = f"planted_{uuid.uuid4().hex[:8]}"
    method = f"{module}_method"
    marker = tmp_path / "marker"
    example = (ROOT / "examples" / "frozen_router.py").read_text().replace(
        'name = "frozen_router"', f'name = "{method}"')
    (tmp_path / f"{module}.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n" + example)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_methods", dict(registry._methods))
    monkeypatch.setattr(registry, "_origin", dict(registry._origin))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    spec = {"run_id": "x", "method": method, "plugins": [module], "method_config": {}}
    (run_dir / "run.json").write_text(json.dumps(spec))
    yield run_dir, module, marker, spec
    sys.modules.pop(module, None)


def test_a_run_folder_never_imports_a_plugin_without_opt_in(planted_plugin):
    from harness.model.lm_eval_model import HarnessLM

    run_dir, module, marker, _ = planted_plugin
    for open_folder in (lambda: load_run_model(run_dir), lambda: HarnessLM(run_dir=str(run_dir))):
        with pytest.raises(PluginError) as info:
            open_folder()
        message = str(info.value)
        assert str(run_dir / "run.json") in message and f"plugin module(s) ['{module}']" in message
        assert "--model_args run_dir=...,trust_plugins=true" in message and "trust_plugins=True" in message
    assert not marker.exists()
    assert module not in sys.modules


def test_a_plugin_is_imported_when_the_user_opts_in(planted_plugin):
    run_dir, module, marker, spec = planted_plugin
    assert module not in sys.modules
    import_run_plugins(spec, run_dir / "run.json", trust_plugins=True)
    assert marker.read_text() == "ran"
    assert get_method(spec["method"]).name == spec["method"]
    import_run_plugins(spec, run_dir / "run.json")  # loaded now: nothing more to import, no opt-in


def test_a_built_in_method_needs_no_opt_in(tmp_path):
    spec = {"method": "smora", "plugins": ["no_such_module_named_by_a_folder"]}
    import_run_plugins(spec, tmp_path / "run.json")  # the built-in is used; the listed module is not imported
    assert "no_such_module_named_by_a_folder" not in sys.modules


def test_lm_eval_model_args_parse_trust_plugins():
    from harness.model.lm_eval_model import _flag

    assert [_flag("trust_plugins", v) for v in ("true", "True", "1", "false", "0", True)] == [
        True, True, True, False, False, True]
    with pytest.raises(ValueError, match="trust_plugins='maybe': use true or false"):
        _flag("trust_plugins", "maybe")


def test_the_readme_says_how_to_opt_in():
    readme = (ROOT / "README.md").read_text()
    assert "trust_plugins=true" in readme
    assert "--include_path results/default/data/tasks" in readme
