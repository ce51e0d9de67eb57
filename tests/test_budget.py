"""The budget solver and parameter accounting: grids, refusals, counted routers, meta builds."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from harness.adapters import BudgetError, TargetShape, Variant, get_method
from harness.plan.budget import (
    BudgetRequest,
    feasible_granularities,
    solve_study,
    standard_grid,
    verify_counts,
)

ROOT = Path(__file__).resolve().parent.parent
SQUARE = [TargetShape(f"l{i}", 64, 64) for i in range(2)]


def test_feasible_grid_gives_expert_rank_and_top_k():
    request = BudgetRequest(64, 8, (8, 16, 32, 64))
    assert feasible_granularities(64, 8) == [8, 16, 32, 64]
    assert [standard_grid(request, g) for g in (8, 16, 32, 64)] == [
        (8, 8, 1),
        (16, 4, 2),
        (32, 2, 4),
        (64, 1, 8),
    ]
    # K that does not divide R still has feasible granularities
    assert feasible_granularities(64, 12) == [16, 32, 64]


def test_granularity_that_does_not_divide_the_rank_is_refused_with_neighbours():
    with pytest.raises(BudgetError) as err:
        standard_grid(BudgetRequest(64, 8, (12,)), 12)
    message = str(err.value)
    assert "granularity 12 does not divide total_rank 64" in message
    assert "feasible granularities for R=64, K=8: [8, 16, 32, 64]" in message
    assert "nearest: [8, 16]" in message


def test_fractional_top_k_is_refused_with_neighbours():
    with pytest.raises(BudgetError) as err:
        standard_grid(BudgetRequest(64, 8, (4,)), 4)
    message = str(err.value)
    assert "top-k = active_rank·G/total_rank = 8·4/64 = 0.5" in message
    assert "nearest: [8, 16]" in message


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        (dict(total_rank=0, active_rank=1), "total_rank must be a positive integer"),
        (dict(total_rank=8, active_rank=9), "active_rank must be an integer between 1 and total_rank=8"),
        (dict(total_rank=8, active_rank=2, router="shared"), "router must be one of separate, counted"),
    ],
)
def test_bad_requests_name_the_value(kwargs, fragment):
    with pytest.raises(BudgetError, match=fragment):
        BudgetRequest(granularities=(2,), **kwargs)


def test_solve_study_collects_every_infeasible_request():
    request = BudgetRequest(16, 4, (3, 4, 5))
    methods = [(get_method("sira"), {}), (get_method("smora"), {})]
    with pytest.raises(BudgetError) as err:
        solve_study(request, methods, SQUARE)
    message = str(err.value)
    for fragment in ("sira (G3)", "sira (G5)", "smora (G3)", "smora (G5)"):
        assert fragment in message
    assert "sira (G4)" not in message


def test_counted_router_shrinks_ranks_to_fit_the_total():
    # R=16, G=8 rank-2 experts on two 64x64 layers; target = LoRA-16 = 2 x 2048.
    # Per layer: E experts of rank r cost E*r*128 + E*64 (router). Hand computation:
    # (8, 2) 2560 +25%; (8, 1) 1536 -25%; (7, 2) 2240 +9.4%; (6, 2) 1920 -6.25%
    request = BudgetRequest(16, 4, (8,), router="counted", tolerance=0.07)
    config = get_method("sira").solve(request, Variant(8, "G8"), SQUARE)
    assert (config.num_experts, config.expert_rank, config.top_k) == (6, 2, 2)
    count = get_method("sira").count_model(config, SQUARE)
    assert (count.total, count.router) == (2 * 1920, 2 * 6 * 64)


def test_counted_router_refuses_with_nearest_feasible_configurations():
    # G=8 cannot land within 4% (closest 6.25%); G=16 can: 11 rank-1 experts, 11*192 = 2112 (+3.1%)
    request = BudgetRequest(16, 4, (8,), router="counted", tolerance=0.04)
    with pytest.raises(BudgetError) as err:
        get_method("smora").solve(request, Variant(8, "G8"), [TargetShape("l", 64, 64)])
    message = str(err.value)
    assert "smora at granularity 8: with router: counted" in message
    assert "within 4.0% of LoRA rank 16's 2,048 parameters (closest: 6.2% off)" in message
    assert "Nearest feasible configurations: G=16: 11 experts of rank 1 (total +3.1%)" in message
    assert "Raise budget.tolerance to at least 6.2%" in message


def test_separate_mode_matches_ranks_and_lists_router_beside():
    request = BudgetRequest(16, 4, (4, 16))
    rows = solve_study(request, [(get_method("smora"), {}), (get_method("lora"), {})], SQUARE)
    by_label = {r.label: r for r in rows}
    assert set(by_label) == {"smora-G4", "smora-G16", "lora-r16", "lora-r4"}
    g16 = by_label["smora-G16"].counts
    # adapter 16*(64+64) per layer, router 16*64 per layer, 2 layers
    assert (g16.total, g16.activated, g16.router) == (2 * (2048 + 1024), 2 * (4 * 128 + 1024), 2 * 1024)
    assert by_label["smora-G16"].as_dict()["total_vs_R"] == 0.0
    assert by_label["smora-G16"].as_dict()["activated_vs_K"] == 0.0


def test_verify_counts_builds_real_layers_on_meta():
    request = BudgetRequest(8, 2, (4, 8))
    methods = {n: get_method(n) for n in ("lora", "multilora", "molora", "sira", "smora", "malora")}
    shapes = [TargetShape("a", 40, 24), TargetShape("b", 24, 40), TargetShape("c", 40, 24)]
    rows = solve_study(request, [(m, {}) for m in methods.values()], shapes)
    verify_counts(rows, methods, shapes)
    assert all(r.verified_total == r.counts.total for r in rows)


def test_paper_scale_budget_from_config_json_alone(tmp_path):
    """A 7B Llama budget from its config.json on the meta device: no weights, seconds."""
    config_json = tmp_path / "config.json"
    config_json.write_text(
        json.dumps(
            {
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "hidden_size": 4096,
                "intermediate_size": 11008,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 32,
                "vocab_size": 32000,
            }
        )
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        f"""
study: budget7b
model: {{source: meta-llama/Llama-2-7b-hf, config_json: {config_json}}}
data: {{source: generated}}
budget: {{total_rank: 64, active_rank: 8, granularities: [8, 16, 32, 64]}}
methods: [lora, smora]
"""
    )
    out = subprocess.run(
        [sys.executable, "-m", "harness", "budget", "--config", str(study), "--json"],
        capture_output=True, text=True, cwd=ROOT, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    rows = {r["run"]: r for r in json.loads(out.stdout)}
    # hand computation for one layer type, q_proj (4096 -> 4096), smora G=64:
    # A 64x4096 + B 4096x64 + router 64x4096 = 786,432 per q_proj; 32 layers
    # all seven projections: attn 4 x (4096+4096), mlp 3 x (4096+11008)
    per_layer_dims = 4 * (4096 + 4096) + 3 * (4096 + 11008)
    router_per_layer = 7 * 64 * 4096 - 64 * (4096 - 11008)  # down_proj reads 11008
    assert rows["lora-r64"]["total"] == 32 * 64 * per_layer_dims
    assert rows["smora-G64"]["total"] == 32 * (64 * per_layer_dims + router_per_layer)
    assert rows["smora-G64"]["router"] == 32 * router_per_layer
    assert rows["smora-G64"]["activated"] == 32 * (8 * per_layer_dims + router_per_layer)
    assert all(r["verified"] for r in rows.values())


def test_mola_spreads_experts_over_depth_with_the_totals_matched():
    """A method whose adapter varies with depth (``Method.layer_config``): MoLA at the
    SmolLM2-135M shapes (30 layers) gives more experts to higher layers, the sum of its
    per-layer ranks is the study's (30 x R within tolerance), the real modules built per
    depth hold exactly the counted parameters, and the budget row shows the allocation."""
    from torch import nn

    from harness.adapters import TargetShape, Variant, apply_method, get_method
    from harness.adapters.grid import BudgetRequest, layer_positions
    from harness.plan.budget import solve_study, verify_counts

    mods = {"q_proj": (576, 576), "k_proj": (576, 192), "down_proj": (1536, 576)}
    shapes = [TargetShape(f"model.layers.{i}.{m}", *s) for i in range(30) for m, s in mods.items()]
    method = get_method("mola")
    rows = solve_study(BudgetRequest(24, 4, (6, 12, 24)), [(method, {})], shapes)
    verify_counts(rows, {"mola": method}, shapes)
    positions = layer_positions(shapes)
    expected = {6: "2-5-7-10", 12: "5-10-15-19", 24: "10-19-29-39"}
    for row in rows:
        G = row.variant.granularity
        assert row.as_dict()["experts_per_layer"] == expected[G]
        assert row.verified_total == row.counts.total
        per_layer = [method.layer_config(row.config, p, n).num_experts for p, n in
                     sorted({positions[s.name] for s in shapes})]
        assert per_layer == sorted(per_layer) and per_layer[0] < per_layer[-1]
        total_rank = sum(per_layer) * row.config.expert_rank
        assert abs(total_rank - 30 * 24) / (30 * 24) <= 0.05
        assert abs(row.as_dict()["total_vs_R"]) <= 0.05
    # the layers built in a model follow the depth (4 layers: one per group)
    model = nn.Module()
    model.layers = nn.ModuleList(nn.Module() for _ in range(4))
    for block in model.layers:
        block.proj = nn.Linear(16, 12)
    targets = [TargetShape(f"layers.{i}.proj", 16, 12) for i in range(4)]
    config = method.solve(BudgetRequest(8, 2, (4,)), Variant(4, "G4"), targets)
    handle = apply_method(model, method, config, targets)  # checks count_model == real numel
    assert [model.layers[i].proj.num_experts for i in range(4)] == config.experts_per_group == [2, 3, 5, 6]
    assert handle.trainable_numel() == method.count_model(config, targets).total


def test_hydralora_takes_the_nearest_whole_rank_and_the_budget_table_notes_the_gap():
    """Whole ranks cannot always match LoRA rank R: HydraLoRA with G heads costs
    ``r·(d_in + G·d_out)``; at R = 24, G = 24 on a 576 x 576 module rank 2 is +4% and rank 1
    -48%, so the nearest (rank 2) is taken, and a total further from R's than
    ``budget.tolerance`` is named in the row's note."""
    shapes = [TargetShape("q", 576, 576)]
    method = get_method("hydralora")
    rows = {r.label: r for r in solve_study(BudgetRequest(24, 4, (6, 24)), [(method, {})], shapes)}
    g24 = rows["hydralora-G24"]
    assert g24.config.rank == 2 and g24.config.heads == 24
    assert g24.matched(g24.counts.total) == 2 * (576 + 24 * 576)
    assert g24.as_dict()["total_vs_R"] == round((2 * 25 * 576 - 24 * 1152) / (24 * 1152), 4)
    assert "total budget off" not in g24.as_dict()["note"]  # +4.2% is within the default 5%
    tight = solve_study(BudgetRequest(24, 4, (24,), tolerance=0.02), [(method, {})], shapes)[0]
    assert tight.as_dict()["note"].startswith("total budget off by +4%")
    # at G = 6 ranks 6 (6·7·576 = 24,192, -12.5%) and 7 (28,224, +2.1%) bracket LoRA-R's
    # 27,648: the nearest, 7, is taken
    assert rows["hydralora-G6"].config.rank == 7


def test_methods_lists_each_method_with_its_budget_mapping_at_a_study(tmp_path):
    """``python -m harness methods --config FILE``: every registered method solved at the
    study's R, K and G (its configuration and counts per variant), and a method the study
    cannot take named with the solver's reason (MoA: R = 8 over 3 tasks)."""
    config_json = tmp_path / "config.json"
    config_json.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 100,
    }))
    study = tmp_path / "study.yaml"
    study.write_text(
        f"study: mapping\nmodel: {{source: tiny, config_json: {config_json}, adapt_layers: all,"
        " target_modules: [q_proj]}\ndata: {source: generated, tasks: [animal, color, fruit]}\n"
        "budget: {total_rank: 8, active_rank: 2, granularities: [4, 8]}\nmethods: [lora, sira]\n"
    )
    out = subprocess.run([sys.executable, "-m", "harness", "methods", "--config", str(study), "--json"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    sira = {row["variant"]: row for row in listed["sira"]["budget"]}
    # two q_proj layers 64 -> 64: LoRA-R 2 x 8 x 128; SiRA G8: 8 rank-1 experts, top 2, router 8 x 64
    assert sira["G8"]["total"] == 2 * (8 * 128 + 8 * 64) and sira["G8"]["router"] == 2 * 8 * 64
    assert sira["G8"]["activated"] == 2 * (2 * 128 + 8 * 64)
    assert sira["G8"]["mapping"].startswith("num_experts=8, expert_rank=1, top_k=2; total 3,072 (+0.0% vs R)")
    assert {row["variant"] for row in listed["hydralora"]["budget"]} == {"G4", "G8"}
    assert listed["moa"]["budget"].startswith("infeasible budget request")
    assert "multiples of 3" in listed["moa"]["budget"]
    text = subprocess.run([sys.executable, "-m", "harness", "methods", "--config", str(study)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300).stdout
    assert "budget G8: num_experts=8, expert_rank=1, top_k=2;" in text
    assert "budget: does not fit this study: infeasible budget request" in text
