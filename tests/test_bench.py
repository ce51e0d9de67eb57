"""The speed benchmark (``python -m harness bench``, harness/bench/) on a tiny random Llama.

What is checked is the bookkeeping, never a timing: every method of the plan and both
peft LoRA references get a row, ratios are computed against LoRA rank R of the same run,
the CSV and Markdown files carry the same numbers, the lower-layer cache trains with the
full-depth losses, the dense and sparse execution paths compute the same function, the
automatic path choice follows the recorded crossover, the scaling sweeps cover every
routed method, and bad ``bench:`` values are refused with the key and what is valid.
"""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch
from torch import nn

from harness.adapters import TargetShape, get_method
from harness.adapters import core as core_module
from harness.adapters.core import choose_path
from harness.adapters.inject import apply_method
from harness.bench import BenchOptions, crossover_point, run_bench, scaling_points
from harness.plan.config import ConfigError, validate_config
from tests.conftest import make_tiny_llama

ROUTED_SWEEPING = ["molora", "sira", "smora", "malora"]


def tiny_config(tmp_path, **bench) -> dict:
    """A study config for a tiny random Llama (4 layers, the top 2 adapted): R = 6, K = 2,
    every built-in method, and the shortest benchmark that still has two repeats."""
    return validate_config(
        {
            "study": "bench-test",
            "out_dir": str(tmp_path / "out"),
            "cache_dir": str(tmp_path / "cache"),
            "model": {
                "source": "tiny-random",
                "tiny": {
                    "hidden_size": 32,
                    "intermediate_size": 48,
                    "num_hidden_layers": 4,
                    "num_attention_heads": 4,
                    "num_key_value_heads": 2,
                    "vocab_size": 512,
                    "seed": 0,
                },
                "adapt_layers": {"top": 2},
            },
            "budget": {"total_rank": 6, "active_rank": 2, "granularities": [3, 6], "alpha": 8},
            "methods": ["lora", "multilora", "molora", "sira", "smora", "malora", "moa"],
            "data": {"source": "generated", "train_per_task": 8, "test_per_task": 4},
            "train": {"seeds": [0], "steps": 4, "batch_size": 4, "lr": 0.003},
            "eval": {"batch_size": 16},
            "bench": {
                "threads": 1,  # the test process's own setting is restored afterwards
                "warmup_steps": 1,
                "timed_steps": 2,
                "repeats": 2,
                "eval_batches": 1,
                "sweep_steps": 1,
                "sweep_repeats": 1,
                "crossover_experts": [4, 8],
                **bench,
            },
        },
        source="bench-test",
    )


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One benchmark run of every section (about 20 s on two cores)."""
    tmp = tmp_path_factory.mktemp("bench")
    config = tiny_config(tmp)
    messages: list[str] = []
    threads = torch.get_num_threads()
    result = run_bench(config, log=messages.append)
    assert torch.get_num_threads() == threads
    return config, result, messages


def _key(row: dict) -> str:
    return f"{row['method']}-{row['variant']}"


# -- the main table ---------------------------------------------------------------------------


def test_rows_are_every_planned_method_at_matched_budget_plus_both_lora_references(bench):
    from harness.plan.study import plan_study

    config, result, _ = bench
    plan = plan_study(config)
    expected = {f"{r.method}-{r.tag}" for r in plan.runs if not r.is_base and r.seed == 0}
    keys = [_key(r) for r in result["main"]]
    assert len(keys) == len(set(keys))
    assert set(keys) == expected | {"lora-r6", "lora-r2"}
    assert {"moa-T6", "smora-G3", "smora-G6", "multilora-G6"} <= set(keys)
    by_key = {_key(r): r for r in result["main"]}
    # the solver's shapes reach the rows: SMoRA G6 = six rank-1 experts, top-2
    assert (
        by_key["smora-G6"]["experts"],
        by_key["smora-G6"]["expert_rank"],
        by_key["smora-G6"]["top_k"],
    ) == (6, 1, 2)
    assert by_key["lora-r6"]["path"] == by_key["lora-r2"]["path"] == "peft"
    # matched total: LoRA rank R holds what SMoRA G6 holds besides its router (router: separate)
    assert by_key["lora-r6"]["trainable_params"] == by_key["smora-G6"][
        "trainable_params"
    ] - _router_params(config, 6)


def _router_params(config, experts: int) -> int:
    """Router parameters of a mixture with ``experts`` experts over the adapted modules."""
    from harness.plan.study import study_shapes

    return sum(experts * s.d_in for s in study_shapes(config))


def test_ratios_are_to_lora_rank_R_of_the_same_run(bench):
    _, result, _ = bench
    rows = result["main"]
    ref = next(r for r in rows if _key(r) == "lora-r6")
    assert ref["ratio_vs_lora_R"] == 1.0
    assert ref["eval_ratio_vs_lora_R"] == 1.0
    assert ref["ratio_min"] == ref["ratio_max"] == 1.0
    for row in rows:
        assert row["step_ms_median"] > 0 and row["step_ms_iqr"] >= 0
        assert row["ratio_vs_lora_R"] == pytest.approx(
            row["step_ms_median"] / ref["step_ms_median"], rel=1e-12
        )
        assert row["eval_ratio_vs_lora_R"] == pytest.approx(
            row["eval_ms_median"] / ref["eval_ms_median"], rel=1e-12
        )
        assert row["ratio_min"] <= row["ratio_max"]
        tokens = row["tokens_per_s"] * row["step_ms_median"] / 1000
        assert (
            tokens == pytest.approx(round(tokens), rel=1e-9) and round(tokens) > 0
        )  # real tokens per batch
        assert row["state_mb"] > 0 and row["saved_act_mb"] > 0


def test_csv_and_markdown_carry_the_same_numbers(bench):
    _, result, messages = bench
    out = result["out"]
    rows = result["main"]
    with open(out / "bench.csv") as f:
        table = list(csv.DictReader(f))
    assert [f"{r['method']}-{r['variant']}" for r in table] == [_key(r) for r in rows]
    for written, row in zip(table, rows):
        for name in (
            "step_ms_median",
            "step_ms_iqr",
            "ratio_vs_lora_R",
            "tokens_per_s",
            "eval_seq_per_s",
            "eval_ratio_vs_lora_R",
        ):
            assert float(written[name]) == pytest.approx(row[name], rel=1e-5), name
    assert float(next(r for r in table if r["variant"] == "r6")["ratio_vs_lora_R"]) == 1.0

    md = (out / "bench.md").read_text()
    lines = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) > 5 and cells[0] in {r["method"] for r in rows}:
            lines[f"{cells[0]}-{cells[1]}"] = cells
    assert set(lines) == {_key(r) for r in rows}
    for row in rows:
        cells = lines[_key(row)]
        assert cells[4] == f"{row['step_ms_median']:.1f} ± {row['step_ms_iqr']:.1f}"
        assert cells[5].startswith(f"{row['ratio_vs_lora_R']:.2f} (")
        assert cells[6] == f"{row['tokens_per_s']:.0f}"
        assert cells[8] == f"{row['eval_ratio_vs_lora_R']:.2f}"
    # the same report is printed
    assert any(m.startswith("# Benchmark: bench-test") and "× LoRA r6" in m for m in messages)


def test_lower_layer_cache_trains_with_the_full_depth_losses(bench):
    config, result, _ = bench
    cache = result["cache"]
    options = BenchOptions.from_config(config)
    assert cache["split_layer"] == 2 and cache["layers_total"] == 4
    # warm-up plus every timed step, the same weights and batches on both sides
    assert cache["steps_compared"] == options.warmup_steps + options.repeats * options.timed_steps
    assert cache["max_abs_loss_diff"] <= 1e-5
    assert (
        math.isfinite(cache["first_loss"]) and cache["first_loss"] != cache["last_loss"]
    )  # it trains
    with open(result["out"] / "cache.csv") as f:
        (written,) = list(csv.DictReader(f))
    assert float(written["max_abs_loss_diff"]) == pytest.approx(
        cache["max_abs_loss_diff"], abs=1e-12
    )


def test_moa_without_trained_task_adapters_is_timed_and_says_so(bench):
    _, result, _ = bench
    text = (result["out"] / "bench.md").read_text()
    assert "moa-T6: 6 of 6 components" in text and "have no trained weights here" in text


def test_evaluation_cache_before_and_after_gives_the_same_scores(bench):
    """One real lm-eval evaluation three ways: building the shared lower-layer cache, reusing
    it, and full depth (the study's data were not written, so a temporary copy is used)."""
    from harness.plan.study import plan_study

    config, result, _ = bench
    e = result["eval_cache"]
    assert e["same_scores"] is True
    assert e["cache_build_acc"] == e["cache_reuse_acc"] == e["no_cache_acc"]
    assert 0 <= e["no_cache_acc"] <= 1
    n = len(plan_study(config).runs)
    assert e["runs_in_study"] == n
    assert e["study_eval_before_s"] == pytest.approx(n * e["no_cache_s"])
    assert e["study_eval_after_s"] == pytest.approx(
        e["cache_build_s"] + (n - 1) * e["cache_reuse_s"]
    )
    out = result["out"]
    assert (out / "eval_cache.csv").exists() and not (out / ".eval_cache_work").exists()
    text = (out / "bench.md").read_text()
    assert "## Evaluation lower-layer cache" in text and "temporary folder" in text
    assert not (tmp := out.parent / "data").exists() or not any(
        tmp.iterdir()
    )  # the study's folder untouched


# -- dense vs sparse ----------------------------------------------------------------------------


SPARSE_CASES = [
    ("sira", dict(expert_dropout=0.0)),
    ("smora", {}),
    ("malora", dict(shared_rank=5)),
    ("molora", dict(sparse=True)),
]


def _layer(name: str, extra: dict, experts: int, rank: int, top_k: int, path: str, seed: int = 0):
    method = get_method(name)
    config = method.make_config(
        num_experts=experts, expert_rank=rank, top_k=top_k, path=path, alpha=4.0, **extra
    )
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.linear = nn.Linear(12, 10, bias=False)
    apply_method(holder, method, config, [TargetShape("linear", 12, 10)])
    layer = holder.linear
    with torch.no_grad():  # trained-looking weights: B non-zero, routers with real preferences
        for i, (_, p) in enumerate(layer.named_parameters()):
            if p.requires_grad:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(100 + i))
    return layer


@pytest.mark.parametrize("name,extra", SPARSE_CASES, ids=[c[0] for c in SPARSE_CASES])
@pytest.mark.parametrize("experts,rank,top_k", [(4, 2, 1), (8, 1, 2), (16, 2, 4), (64, 1, 3)])
def test_sparse_and_dense_paths_give_the_same_outputs_and_gradients(
    name, extra, experts, rank, top_k
):
    if name == "malora":
        extra = dict(shared_rank=max(rank, 5))
    x = torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(1))
    results = {}
    for path in ("dense", "sparse"):
        layer = _layer(name, extra, experts, rank, top_k, path)
        assert layer.path == path
        layer.train()  # capacity (SiRA) and the load statistics are active
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
        results[path] = (out.detach(), xi.grad.clone(), grads, layer.expert_load())
    dense, sparse = results["dense"], results["sparse"]
    torch.testing.assert_close(sparse[0], dense[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse[1], dense[1], rtol=1e-4, atol=1e-5)
    assert dense[2].keys() == sparse[2].keys()
    for pname in dense[2]:
        torch.testing.assert_close(
            sparse[2][pname], dense[2][pname], rtol=1e-4, atol=1e-5, msg=pname
        )
    torch.testing.assert_close(sparse[3], dense[3])


def test_sparse_and_dense_paths_train_a_model_to_the_same_losses():
    """A whole tiny Llama, three optimizer steps on each path: the same losses."""
    from contextlib import nullcontext

    from harness.model.load import adapted_layer_indices, target_shapes
    from harness.model.lower_cache import pad_batch
    from harness.run.train import answer_loss

    targets_names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    g = torch.Generator().manual_seed(3)
    seqs = [
        torch.randint(1, 97, (int(n),), generator=g).tolist()
        for n in torch.randint(5, 12, (6,), generator=g)
    ]
    ids, mask = pad_batch(seqs, pad_id=0)
    rows = torch.arange(len(seqs))
    cols = torch.tensor([len(s) - 2 for s in seqs])
    batch = (ids, mask, rows, cols, torch.tensor([s[-1] for s in seqs]))
    losses = {}
    for path in ("dense", "sparse"):
        model = make_tiny_llama(layers=3)
        targets = target_shapes(model, targets_names, adapted_layer_indices(model, {"top": 2}))
        method = get_method("smora")
        torch.manual_seed(0)
        handle = apply_method(
            model,
            method,
            method.make_config(num_experts=16, expert_rank=1, top_k=2, path=path),
            targets,
        )
        # plain SGD: Adam would blow a rounding-level gradient difference up to a full step
        optimizer = torch.optim.SGD(handle.trainable_parameters(), lr=0.5)
        model.train()
        losses[path] = []
        for _ in range(3):
            loss = answer_loss(model, handle, batch, None, nullcontext())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            handle.after_optimizer_step()
            losses[path].append(float(loss.detach()))
    assert losses["dense"][0] != losses["dense"][-1]
    assert losses["sparse"] == pytest.approx(losses["dense"], abs=1e-5)


def test_auto_path_follows_the_recorded_crossover(monkeypatch):
    ratio = core_module.SPARSE_CROSSOVER_RATIO
    k = 2
    assert choose_path("auto", ratio * k, k) == "sparse"
    assert choose_path("auto", ratio * k - 1, k) == "dense"
    assert choose_path("auto", 10_000, None) == "dense"  # dense routing has no selection
    assert choose_path("dense", 10_000, 1) == "dense" and choose_path("sparse", 2, 1) == "sparse"
    with pytest.raises(ValueError, match="top-k"):
        choose_path("sparse", 8, None)
    with pytest.raises(ValueError, match="'auto', 'dense' or 'sparse'"):
        choose_path("fast", 8, 2)
    # a layer built with path: auto resolves through the same constant
    monkeypatch.setattr(core_module, "SPARSE_CROSSOVER_RATIO", 4)
    assert _layer("smora", {}, 8, 1, 2, "auto").path == "sparse"  # 8 / 2 = 4
    assert _layer("smora", {}, 6, 1, 2, "auto").path == "dense"  # 6 / 2 = 3
    assert _layer("sira", {}, 16, 1, 4, "auto").path == "sparse"


def test_crossover_rows_pair_both_paths_and_record_the_auto_choice(bench):
    _, result, _ = bench
    rows = result["crossover"]
    assert {(r["experts"], r["path"]) for r in rows} == {
        (4, "dense"),
        (4, "sparse"),
        (8, "dense"),
        (8, "sparse"),
    }
    for r in rows:
        assert (
            r["top_k"] == 2 and r["expert_rank"] == 1 and r["experts_per_top_k"] == r["experts"] / 2
        )
        assert r["auto_picks"] == choose_path("auto", r["experts"], r["top_k"])
        pair = {x["path"]: x for x in rows if x["experts"] == r["experts"]}
        assert r["sparse_over_dense"] == pytest.approx(
            pair["sparse"]["step_ms_median"] / pair["dense"]["step_ms_median"]
        )
    assert (result["out"] / "crossover.csv").exists()
    assert (
        "## Dense vs sparse execution (smora, rank-1 experts)"
        in (result["out"] / "bench.md").read_text()
    )


def _rows(*pairs):
    out = []
    for ratio, rel in pairs:
        for path in ("dense", "sparse"):
            out.append({"experts_per_top_k": ratio, "sparse_over_dense": rel, "path": path})
    return out


def test_crossover_point_on_synthetic_rows():
    assert crossover_point(_rows((2, 1.6), (4, 1.2), (8, 0.95), (16, 0.6))) == 8
    assert (
        crossover_point(_rows((16, 0.6), (2, 1.6), (8, 0.95), (4, 1.2))) == 8
    )  # order does not matter
    assert (
        crossover_point(_rows((2, 0.9), (4, 1.1), (8, 0.8), (16, 0.7))) == 8
    )  # from 8 on at every point
    assert crossover_point(_rows((2, 0.9), (4, 0.8))) == 2
    assert (
        crossover_point(_rows((2, 1.3), (4, 1.1), (8, 0.9), (16, 1.0))) is None
    )  # dense wins at the top
    assert crossover_point(_rows((2, 1.3), (4, 1.1))) is None
    assert crossover_point([]) is None


# -- scaling --------------------------------------------------------------------------------------


def test_scaling_points_cover_both_sweeps(tmp_path):
    config = tiny_config(tmp_path)
    points = scaling_points(config)
    experts = [(g, r) for s, g, r, _ in points if s == "experts"]
    assert experts == [(2, 6), (3, 6), (6, 6)]  # every divisor G >= 2 of R = 6
    ranks = [(g, r, k) for s, g, r, k in points if s == "total_rank"]
    assert ranks == [(6, 6, 2), (6, 12, 4), (6, 24, 8), (6, 48, 16), (6, 96, 32)]


def test_scaling_rows_cover_every_routed_method(bench):
    config, result, _ = bench
    rows = result["scaling"]
    points = scaling_points(config)
    for method in ROUTED_SWEEPING:
        for sweep in ("experts", "total_rank"):
            have = {
                (r["experts"] if sweep == "experts" else r["total_rank"])
                for r in rows
                if r["method"] == method and r["sweep"] == sweep
            }
            want = {(g if sweep == "experts" else r) for s, g, r, _ in points if s == sweep}
            skipped = [n for n in result_notes(result) if n.startswith(f"scaling: {method} ")]
            assert have == want or skipped, (method, sweep, have, want)
    assert not any(
        r["method"] in ("moa", "multilora", "lora") for r in rows if r["sweep"] != "reference"
    )
    lora = {r["total_rank"] for r in rows if r["sweep"] == "reference" and r["method"] == "lora"}
    assert lora == {r for _, _, r, _ in points}
    assert all(r["step_ms_median"] > 0 for r in rows)
    for name in ("scaling.csv", "scaling.png", "scaling.pdf"):
        assert (result["out"] / name).stat().st_size > 0
    assert "moa left out" in (result["out"] / "bench.md").read_text()


def result_notes(result) -> list[str]:
    text = (result["out"] / "bench.md").read_text()
    return [line[2:] for line in text.splitlines() if line.startswith("- ")]


# -- bad settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bench_values, fragment",
    [
        ({"threads": 0}, "bench.threads = 0 is out of range; valid: >= 1"),
        ({"timed_steps": "ten"}, "bench.timed_steps = 'ten' has type str; expected integer"),
        ({"crossover_experts": []}, "bench.crossover_experts"),
        ({"crossover_experts": [1, 8]}, "bench.crossover_experts[0] = 1 is out of range"),
        ({"warm_up": 3}, "unknown key(s) 'warm_up' (did you mean 'warmup_steps'?) in bench; allowed keys:"),
        ({"eval_cache": "yes"}, "bench.eval_cache = 'yes' has type str; expected boolean"),
    ],
)
def test_schema_refuses_bad_bench_values(tmp_path, bench_values, fragment):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, **bench_values)
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    "bench_values, overrides, fragments",
    [
        ({}, {"threads": 0}, ["bench.threads = 0", "integer >= 1"]),
        ({}, {"repeats": 0}, ["bench.repeats = 0", "integer >= 1"]),
        (
            {"crossover_method": "nosuch"},
            {},
            ["bench.crossover_method = 'nosuch'", "Registered methods:", "smora"],
        ),
        (
            {"crossover_method": "lora"},
            {},
            ["bench.crossover_method = 'lora'", "no sparse path", "sira, smora"],
        ),
        (
            {"crossover_method": "molora"},
            {},
            ["bench.crossover_method = 'molora'", "no sparse path", "methods of this study that have one: sira, smora, malora"],
        ),
        ({"crossover_method": "moa"}, {}, ["bench.crossover_method = 'moa'"]),
        (
            {"crossover_experts": [2, 2]},
            {},
            ["bench.crossover_experts = [2, 2]", "active rank K = 2"],
        ),
    ],
)
def test_bench_options_refuse_values_the_benchmark_cannot_run(
    tmp_path, bench_values, overrides, fragments
):
    config = tiny_config(tmp_path, **bench_values)
    with pytest.raises(ConfigError) as err:
        BenchOptions.from_config(config, **overrides)
    for fragment in fragments:
        assert fragment in str(err.value)


def test_crossover_checks_are_skipped_when_the_sweep_is_off(tmp_path):
    config = tiny_config(tmp_path, crossover_method="lora", crossover=False)
    assert BenchOptions.from_config(config).crossover is False


def test_cli_refuses_a_bad_value_before_loading_anything(tmp_path, capsys):
    import yaml

    from harness.cli.main import main

    config = tiny_config(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["bench", "--config", str(path), "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert re.search(r"bench\.threads = 0 .*integer >= 1", err)
    assert not (tmp_path / "out" / "bench").exists()


def test_a_batch_larger_than_the_training_data_is_refused_by_its_key(tmp_path):
    config = tiny_config(tmp_path, batch_size=1000)
    with pytest.raises(
        ConfigError, match=r"bench\.batch_size = 1000 exceeds the 48 training examples"
    ):
        run_bench(config, log=lambda _: None)
