"""The adapted layers' shapes stored by the data step (harness.model.shapes): equal to the
built ones, read back by later plans, keyed by everything that decides them, and never
written by planning itself."""

from __future__ import annotations

import copy
import json

import yaml

from harness.model.shapes import built_shapes, read_stored, shapes_key, store_shapes, study_shapes
from harness.plan.config import load_config
from harness.plan.study import plan_study
from tests.conftest import TINY_STUDY_MODEL


def _config(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({
        "study": "shapes", "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
        "model": TINY_STUDY_MODEL, "budget": {"total_rank": 4, "active_rank": 2, "granularities": [2]},
        "methods": ["molora"], "data": {"source": "generated", "train_per_task": 8, "test_per_task": 4},
    }))
    return load_config(path)


def test_stored_shapes_equal_the_built_ones_and_plans_read_them(tmp_path):
    config = _config(tmp_path)
    assert read_stored(config) is None
    plan_study(config)
    assert not (tmp_path / "cache").exists()  # planning writes nothing
    path = store_shapes(config)
    assert read_stored(config) == built_shapes(config["model"]) == study_shapes(config)
    # a later plan reads the stored file (shown by a planted, different shape)
    stored = json.loads(path.read_text())
    stored["shapes"][0][2] += 1
    path.write_text(json.dumps(stored))
    assert study_shapes(config)[0].d_out == built_shapes(config["model"])[0].d_out + 1
    # an unreadable file is not shapes: they are built again
    path.write_text("{not json")
    assert study_shapes(config) == built_shapes(config["model"])


def test_the_key_follows_what_decides_a_shape_and_nothing_else(tmp_path):
    config = _config(tmp_path)
    key = shapes_key(config["model"])
    for field, value in (("adapt_layers", "all"), ("target_modules", ["q_proj"])):
        changed = copy.deepcopy(config["model"])
        changed[field] = value
        assert shapes_key(changed) != key, field
    wider = copy.deepcopy(config["model"])
    wider["tiny"] = {**wider["tiny"], "hidden_size": wider["tiny"]["hidden_size"] * 2}
    assert shapes_key(wider) != key
    same = copy.deepcopy(config["model"])
    same["dtype"] = "bfloat16"
    assert shapes_key(same) == key
