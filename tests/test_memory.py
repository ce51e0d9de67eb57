"""The peak-memory estimate (harness/plan/memory.py): hand-computed numbers for a tiny config, how
the terms move, and real tensors on the CPU (parameters, gradients and AdamW state exactly;
the activations against what autograd really saves)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from harness.adapters import BudgetRequest, TargetShape, apply_method, get_method
from harness.plan.memory import (
    GIB,
    ModelDims,
    estimate_memory,
    fits,
    markdown,
    memory_table,
    row_shape,
)

# a tiny Llama-style config: h = 64, L = 2, a = 4, a_kv = 2 (d = 16, q = 64, kv = 32), I = 96
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 96, "vocab_size": 100, "tie_word_embeddings": True}
COUNTS = (1000, 500, 100)  # (total, activated, router)
BASE = dict(batch_size=2, seq_len=8, dtype="bfloat16", n_adapted_modules=14, rank_width=8)


def test_hand_computed_terms_for_a_tiny_config():
    est = estimate_memory(TINY, COUNTS, **BASE)
    b = {k: v * GIB for k, v in est.items()}
    # base: V·h (tied) + L·(h·q + 2·h·kv + q·h + 3·h·I + 2·h) + h, in bf16
    per_layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 96 + 2 * 64  # 30,848
    assert b["base_weights"] == pytest.approx(2 * (100 * 64 + 2 * per_layer + 64))  # 136,320
    assert b["adapter_params"] == pytest.approx(4 * 1000)
    assert b["gradients"] == pytest.approx(4 * 1000)
    assert b["optimizer_states"] == pytest.approx(8 * 1000)
    assert b["autocast_weight_copies"] == pytest.approx(2 * 1000)
    # per token and layer, c = 2 (bf16 autocast), f = 4:
    a_layer = 2 * 65 * 4 + (4 * 64 * 2 + 4 * 4) + 3 * 96 * 2  # norms 520 + SDPA 528 + SwiGLU 576
    inputs = (5 * 64 + 64 + 96) * 1 * 2  # one bf16 input copy per module (LoRA: A only)
    ranks = 7 * 8 * 2  # B saves A x: W = 8 per module
    a_adapters = inputs + ranks  # 960 + 112
    tokens = 2 * 8
    assert b["activations"] == pytest.approx(tokens * 2 * (a_layer + a_adapters) + 2 * 100 * 4)  # 87,072
    assert b["backward_transient"] == pytest.approx(tokens * (a_layer + a_adapters))  # 43,136
    assert b["cuda_context"] == pytest.approx(0.5 * GIB)


def test_terms_add_up_and_the_context_is_outside_allocated():
    est = estimate_memory(TINY, COUNTS, **BASE)
    terms = ["base_weights", "adapter_params", "gradients", "optimizer_states",
             "autocast_weight_copies", "activations", "backward_transient"]
    assert est["allocated"] == pytest.approx(sum(est[t] for t in terms))
    assert est["total"] == pytest.approx(est["allocated"] + est["cuda_context"])


def test_checkpointing_lowers_activations_by_the_hand_computed_amount():
    plain = estimate_memory(TINY, COUNTS, **BASE)
    ckpt = estimate_memory(TINY, COUNTS, **BASE, gradient_checkpointing=True)
    assert ckpt["activations"] < plain["activations"]
    assert ckpt["total"] < plain["total"]
    # every layer's input (h·c), one layer recomputed, the final norm's fp32 input
    one_layer = 1624 + 1072
    expected = 16 * (2 * 64 * 2 + one_layer + 65 * 4) + 2 * 100 * 4
    assert ckpt["activations"] * GIB == pytest.approx(expected)
    # everything but the activations is unchanged
    for k in ("base_weights", "adapter_params", "optimizer_states", "backward_transient"):
        assert ckpt[k] == plain[k]


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("routed", [False, True])
def test_doubling_the_batch_doubles_the_activation_term_exactly(checkpointing, routed):
    kw = dict(BASE, gradient_checkpointing=checkpointing, routed=routed, num_experts=8, top_k=2)
    one = estimate_memory(TINY, COUNTS, **kw)
    two = estimate_memory(TINY, COUNTS, **{**kw, "batch_size": 4})
    assert two["activations"] == pytest.approx(2 * one["activations"], rel=1e-12)
    assert two["backward_transient"] == pytest.approx(2 * one["backward_transient"], rel=1e-12)
    for k in ("base_weights", "adapter_params", "gradients", "optimizer_states", "autocast_weight_copies"):
        assert two[k] == one[k]


def test_routing_and_gating_add_the_documented_per_token_bytes():
    lora = estimate_memory(TINY, COUNTS, **BASE)
    routed = estimate_memory(TINY, COUNTS, **{**BASE, "routed": True, "num_experts": 8, "top_k": 2})
    # per module per token: A x gated (+W·c), scores, probabilities and gate (3·E·c), the
    # top-k indices saved twice (2·8·k); the router shares the input copy of the fused matmul
    extra_per_layer = 7 * (8 * 2 + 3 * 8 * 2 + 2 * 8 * 2)
    assert (routed["activations"] - lora["activations"]) * GIB == pytest.approx(16 * 2 * extra_per_layer)


def test_float32_has_no_autocast_copies_and_shares_module_inputs():
    est = estimate_memory(TINY, COUNTS, **{**BASE, "dtype": "float32"})
    assert est["autocast_weight_copies"] == 0
    assert est["base_weights"] * GIB == pytest.approx(4 * ModelDims.from_config(TINY).base_parameters())


def test_llama_2_7b_base_weights():
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).parents[1] / "harness" / "model" / "configs" / "llama-2-7b.json").read_text())
    dims = ModelDims.from_config(config)
    assert dims.base_parameters() == 6_738_415_616
    est = estimate_memory(config, (159_907_840, 159_907_840, 0), batch_size=16, seq_len=512,
                          gradient_checkpointing=True, n_adapted_modules=224, rank_width=64)
    assert est["base_weights"] == pytest.approx(6_738_415_616 * 2 / GIB)
    assert fits(est["total"], 80) and not fits(200.0, 80)


def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(ValueError, match="intermediate_size"):
        estimate_memory({k: v for k, v in TINY.items() if k != "intermediate_size"}, COUNTS, **BASE)
    with pytest.raises(ValueError, match="not a multiple"):
        estimate_memory(TINY, COUNTS, **{**BASE, "n_adapted_modules": 13})
    with pytest.raises(ValueError, match="dtype"):
        estimate_memory(TINY, COUNTS, **{**BASE, "dtype": "int8"})


# -- real tensors on the CPU ----------------------------------------------------------------------


def tiny_llama(attn: str = "eager", tied: bool = True):
    """A 3-layer Llama; with SDPA without grouped KV heads: transformers then never repeats
    K and V (unmasked batches run grouped-query SDPA on unrepeated K/V, masked ones repeat
    them, and the estimate counts them repeated, as the harness's padded batches run)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4 if attn == "sdpa" else 2, max_position_embeddings=64,
        tie_word_embeddings=tied, attn_implementation=attn,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model, config


def targets_of(model):
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [TargetShape(n, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[2] in names]


class Row:
    """What a budget row offers memory_table: method, variant, config, counts, routed."""

    def __init__(self, method, config, counts, variant):
        self.method, self.config, self.counts, self.variant = method.name, config, counts, variant
        self.routed = method.routed

    @property
    def label(self):
        return f"{self.method}-{self.variant.tag}"


CASES = [("lora", 1, {}), ("multilora", 4, {}), ("molora", 4, {}), ("molora", 4, {"sparse": True}),
         ("sira", 4, {}), ("smora", 8, {}), ("malora", 4, {})]


def adapted(name, g, options, attn="eager", tied=True):
    model, config = tiny_llama(attn, tied)
    targets = targets_of(model)
    method = get_method(name)
    request = BudgetRequest(8, 2, (g,), "separate", 0.05, 16.0)
    variant = method.variants(request, options)[0]
    method_config = method.solve(request, variant, targets, options)
    handle = apply_method(model, method, method_config, targets)
    row = Row(method, method_config, method.count_model(method_config, targets), variant)
    return model, config, targets, handle, row


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("case", CASES[:1] + CASES[4:5] + CASES[6:], ids=["lora", "sira", "malora"])
def test_parameter_gradient_and_adamw_terms_equal_real_tensor_bytes(case, tied):
    model, config, targets, handle, row = adapted(*case, tied=tied)
    model.to(torch.bfloat16)
    for p in handle.trainable_parameters():  # adapters in fp32, as training keeps them
        p.data = p.data.float()
    params = handle.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer.step()
    est = estimate_memory(config.to_dict(), row.counts, batch_size=2, seq_len=8, dtype="bfloat16",
                          n_adapted_modules=len(targets), module_shapes=targets, **row_shape(row))
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    assert est["base_weights"] * GIB == frozen
    assert est["adapter_params"] * GIB == sum(p.numel() * p.element_size() for p in params)
    assert est["gradients"] * GIB == sum(p.grad.numel() * p.grad.element_size() for p in params)
    state = sum(t.numel() * t.element_size() for s in optimizer.state.values() for k, t in s.items()
                if torch.is_tensor(t) and k != "step")
    assert est["optimizer_states"] * GIB == state
    assert est["autocast_weight_copies"] * GIB == sum(p.numel() * 2 for p in params)


def saved_bytes(model, handle, autocast: bool, batch=4, seq=16):
    """Bytes of the distinct tensors autograd saves in one forward (parameters excluded),
    as harness.run.train runs it: token mask set, logits at one answer position per row."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    params |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen: dict[int, int] = {}

    def pack(x):
        storage = x.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return x

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    rows, cols = torch.arange(batch), torch.full((batch,), seq - 1)
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x), handle.token_mask(mask):
        with context:
            hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
            logits = model.lm_head(hidden[rows, cols])
        torch.nn.functional.cross_entropy(logits.float(), torch.zeros(batch, dtype=torch.long))
    return sum(seen.values())


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("case", CASES, ids=[f"{n}{'-sparse' if o else ''}" for n, _, o in CASES])
def test_activation_term_against_saved_tensors_fp32(case, attn):
    model, config, targets, handle, row = adapted(*case, attn=attn)
    measured = saved_bytes(model, handle, autocast=False)
    est = estimate_memory(config.to_dict(), row.counts, batch_size=4, seq_len=16, dtype="float32",
                          n_adapted_modules=len(targets), module_shapes=targets, attention=attn,
                          **row_shape(row))
    assert measured / ((est["activations"] + est["fused_weight_copies"]) * GIB) == pytest.approx(1.0, abs=0.03)


@pytest.mark.parametrize("case", CASES, ids=[f"{n}{'-sparse' if o else ''}" for n, _, o in CASES])
def test_activation_term_against_saved_tensors_under_bf16_autocast(case):
    """bf16 base, fp32 adapters, bf16 autocast (on the CPU: the same casts as on CUDA for the
    matmuls). Autocast's bf16 copies of the adapter weights are saved too: they are the
    ``autocast_weight_copies`` term."""
    model, config, targets, handle, row = adapted(*case, attn="eager")
    model.to(torch.bfloat16)
    for p in handle.trainable_parameters():
        p.data = p.data.float()
    measured = saved_bytes(model, handle, autocast=True)
    est = estimate_memory(config.to_dict(), row.counts, batch_size=4, seq_len=16, dtype="bfloat16",
                          n_adapted_modules=len(targets), module_shapes=targets, attention="eager",
                          **row_shape(row))
    expected = (est["activations"] + est["autocast_weight_copies"] + est["fused_weight_copies"]) * GIB
    assert measured / expected == pytest.approx(1.0, abs=0.06)


def test_memory_table_one_row_per_budget_row_of_a_study():
    from harness.plan.config import validate_config
    from harness.plan.study import plan_study

    config = validate_config({
        "study": "mem",
        "model": {"source": "tiny-random", "adapt_layers": "all",
                  "tiny": {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
                           "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512}},
        "budget": {"total_rank": 8, "active_rank": 2, "granularities": [4, 8]},
        "methods": ["lora", "multilora", "molora", "sira", "smora", "malora"],
        "data": {"source": "generated"},
        "train": {"batch_size": 4, "max_length": 32, "gradient_checkpointing": True},
    })
    plan = plan_study(config)
    model_config = {**TINY, "vocab_size": 512}
    frame = memory_table(plan.rows, model_config, batch_size=4, seq_len=32, module_shapes=plan.shapes,
                         gradient_checkpointing=True)
    assert list(frame["run"]) == [r.label for r in plan.rows]
    assert {"total", "allocated", "activations", "fits 24 GB", "fits 40 GB", "fits 80 GB"} <= set(frame.columns)
    assert frame["fits 24 GB"].all()
    for row, (_, rec) in zip(plan.rows, frame.iterrows()):
        assert rec["trainable"] == row.counts.total
        assert rec["adapter_params"] * GIB == 4 * row.counts.total
    # the routed rows carry the router's activations and a wider rank intermediate
    by_run = frame.set_index("run")
    assert by_run.loc["sira-G8", "activations"] > by_run.loc["lora-r8", "activations"]
    bigger = memory_table(plan.rows, model_config, batch_size=8, seq_len=32, module_shapes=plan.shapes,
                          gradient_checkpointing=True)
    assert (bigger["activations"] == 2 * frame["activations"]).all()
    text = markdown(frame)
    assert text.count("\n") == len(frame) + 1 and "sira-G8" in text
