"""The granularity newcomers (GraLoRA, FlyLoRA, GOAT): the toolkit's layer checks, their
budget mapping at the default study's shapes, and each held against its reference:

* GraLoRA is peft's own layer; it is held against the ``k x k`` block formula of the paper;
* FlyLoRA and GOAT against re-implementations of their authors' code
  (``tests/oracles/flylora.py``, ``tests/oracles/goat.py``), in float64, outputs and
  gradients; where we differ on purpose the test shows the difference (``..._differs_...``)
  and the mapping under which both agree (``docs/fidelity.md``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters import (
    BudgetError,
    BudgetRequest,
    TargetShape,
    Variant,
    apply_method,
    get_method,
)
from harness.adapters.grid import lora_count
from harness.adapters.testing import check_layer
from tests.conftest import make_tiny_llama
from tests.oracles import flylora as fly_ref
from tests.oracles import goat as goat_ref

DT = torch.float64
D_IN, D_OUT = 12, 8

#: the default study's adapted modules (SmolLM2-135M, top decoder layer)
SMOLLM2_TOP = [
    TargetShape(f"model.layers.29.{n}", d_in, d_out)
    for n, d_in, d_out in [
        ("self_attn.q_proj", 576, 576), ("self_attn.k_proj", 576, 192), ("self_attn.v_proj", 576, 192),
        ("self_attn.o_proj", 576, 576), ("mlp.gate_proj", 576, 1536), ("mlp.up_proj", 576, 1536),
        ("mlp.down_proj", 1536, 576),
    ]
]
DEFAULT = BudgetRequest(total_rank=24, active_rank=4, granularities=(6, 12, 24), alpha=16)


def tokens(seed: int = 1, batch: int = 3, seq: int = 5, d: int = D_IN) -> torch.Tensor:
    return torch.randn(batch, seq, d, generator=torch.Generator().manual_seed(seed), dtype=DT)


def upstream_grads(out, inputs, seed: int = 7):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    found = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, found)]


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ======================================================================================
# GraLoRA — peft's gralora tuner
# ======================================================================================


def gralora_holder(rank: int, k: int, alpha: float = 8.0, seed: int = 0):
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.linear = nn.Linear(D_IN, D_OUT)
    method = get_method("gralora")
    config = method.make_config(rank=rank, k=k, alpha=alpha)
    handle = apply_method(holder, method, config, [TargetShape("linear", D_IN, D_OUT)])
    holder.to(DT)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * 0.3)
    return holder, config


@pytest.mark.parametrize("rank,k", [(4, 2), (4, 4), (6, 2)])
def test_gralora_passes_the_layer_checks(rank, k):
    method = get_method("gralora")
    check_layer(method, method.make_config(rank=rank, k=k, alpha=8), d_in=16, d_out=12)


@pytest.mark.parametrize("rank,k", [(4, 1), (4, 2), (6, 2), (4, 4)])
def test_gralora_is_the_papers_block_formula(rank, k):
    """peft's forward = alpha/R · sum_j B_ij A_ij x_j over the k x k grid, with block (i, j)'s
    pair read from peft's storage: A_ij = gralora_A[j][:, i-th rank group],
    B_ij = gralora_B[i][j-th rank group, :]; k = 1 is LoRA rank R."""
    holder, config = gralora_holder(rank, k)
    layer = holder.linear
    A, B = layer.gralora_A["default"], layer.gralora_B["default"]  # (k, d_in/k, R), (k, R, d_out/k)
    x = tokens()
    rb, di = rank // k, D_IN // k
    xs = x.split(di, dim=-1)
    outs = []
    for i in range(k):
        y = sum(xs[j] @ A[j][:, i * rb:(i + 1) * rb] @ B[i][j * rb:(j + 1) * rb, :] for j in range(k))
        outs.append(y)
    expected = layer.base_layer(x) + (config.alpha / rank) * torch.cat(outs, dim=-1)
    close(layer(x), expected)
    # the merged weight (peft's get_delta_weight) is the same map
    close(layer.base_layer(x) + x @ layer.get_delta_weight("default").T, expected)
    assert sum(p.numel() for p in layer.parameters() if p.requires_grad) == rank * (D_IN + D_OUT)


def test_gralora_budget_rows_at_the_default_study():
    method = get_method("gralora")
    variants = method.variants(DEFAULT, {})
    assert [v.tag for v in variants] == ["k2", "k4", "k8"]
    for v in variants:
        config = method.solve(DEFAULT, v, SMOLLM2_TOP, {})
        assert (config.rank, config.k) == (24, v.granularity)
        count = method.count_model(config, SMOLLM2_TOP)
        assert count.total == count.activated == lora_count(24, SMOLLM2_TOP) == 244_224
        assert count.router == 0
    with pytest.raises(BudgetError, match=r"k=5 does not divide total_rank 24.*valid k for R=24: \[1, 2, 3, 4, 6, 8, 12, 24\]"):
        method.solve(DEFAULT, Variant(5, "k5"), SMOLLM2_TOP, {})
    odd = [TargetShape("m.layers.0.x", 10, 8)]
    with pytest.raises(BudgetError, match=r"k=4 does not divide module 'm.layers.0.x' \(10 -> 8\)"):
        method.solve(DEFAULT, Variant(4, "k4"), odd, {})


# ======================================================================================
# FlyLoRA — gfyddha/FlyLoRA (tests/oracles/flylora.py)
# ======================================================================================


def fly_layer(rank=8, top_k=2, alpha=16.0, seed=0, **options):
    method = get_method("flylora")
    config = method.make_config(rank=rank, top_k=top_k, alpha=alpha, **options)
    torch.manual_seed(seed)
    layer = method.make_layer(nn.Linear(D_IN, D_OUT), config).to(DT)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=torch.Generator().manual_seed(seed + 5), dtype=DT))
    return layer, config


@pytest.mark.parametrize("magnitude", [False, True])
def test_flylora_passes_the_layer_checks(magnitude):
    method = get_method("flylora")
    check_layer(method, method.make_config(rank=8, top_k=2, alpha=8, magnitude=magnitude))


def test_flylora_A_is_the_authors_sparse_init():
    method = get_method("flylora")
    torch.manual_seed(3)
    layer = method.make_layer(nn.Linear(40, 8), method.make_config(rank=8, top_k=2))
    torch.manual_seed(3)
    nn.Linear(40, 8)  # the same draws as the base layer above
    theirs = fly_ref.sparse_init(torch.empty(8, 40), r=8, top_k=2)
    assert torch.equal(layer.fly_A, theirs)
    assert ((layer.fly_A != 0).sum(1) == 40 // (8 // 2)).all()  # p = n // (r // k) per row
    assert not layer.fly_A.requires_grad and "fly_A" in dict(layer.named_buffers())
    assert [n for n, p in layer.named_parameters() if p.requires_grad] == ["lora_B"]


@pytest.mark.parametrize("magnitude", [False, True])
def test_flylora_matches_the_authors_forward_and_bias_update(magnitude):
    layer, config = fly_layer(magnitude=magnitude)
    layer.train()
    x = tokens()
    bias = torch.randn(8, generator=torch.Generator().manual_seed(9), dtype=DT) * 0.1
    layer.selection_bias.copy_(bias)
    xo, Bo = leaf(x), leaf(layer.lora_B)
    ref, ref_bias = fly_ref.flylora_forward(
        xo, layer.base_layer.weight, layer.base_layer.bias, layer.fly_A, Bo, bias,
        top_k=2, lora_alpha=16.0, bias_u=config.bias_update_rate, magnitude=magnitude, input_grad=True,
    )
    xs = leaf(x)
    ours = layer(xs)
    close(ours, ref)
    for a, b in zip(upstream_grads(ours, [xs, layer.lora_B]), upstream_grads(ref, [xo, Bo])):
        close(a, b)
    layer.after_optimizer_step()  # ours moves the bias once per step, from this step's counts
    close(layer.selection_bias, ref_bias)
    assert not torch.equal(ref_bias, bias)


def test_flylora_differs_input_gradient_from_the_training_code():
    """Their training forward computes A x under no_grad: the same output and B gradient,
    but no gradient reaches x through the adapter. Ours keeps it (as their flylora.py)."""
    layer, config = fly_layer()
    x = tokens()
    xo, Bo = leaf(x), leaf(layer.lora_B)
    ref, _ = fly_ref.flylora_forward(
        xo, layer.base_layer.weight, layer.base_layer.bias, layer.fly_A, Bo, layer.selection_bias,
        top_k=2, lora_alpha=16.0, bias_u=config.bias_update_rate,
    )
    xs = leaf(x)
    ours = layer(xs)
    close(ours, ref)
    (gx, gB), (rx, rB) = upstream_grads(ours, [xs, layer.lora_B]), upstream_grads(ref, [xo, Bo])
    close(gB, rB)
    close(rx, upstream_grads(layer.base_layer(xo), [xo])[0])  # theirs: the base layer's only
    assert not torch.allclose(gx, rx)


def test_flylora_differs_no_bias_update_in_evaluation():
    """Their bias moves at every forward, evaluation too; ours only after a training step."""
    layer, config = fly_layer()
    layer.eval()
    with torch.no_grad():
        layer(tokens())
    layer.after_optimizer_step()
    assert torch.equal(layer.selection_bias, torch.zeros(8, dtype=DT))
    _, theirs = fly_ref.flylora_forward(
        tokens(), layer.base_layer.weight, layer.base_layer.bias, layer.fly_A, layer.lora_B,
        torch.zeros(8, dtype=DT), top_k=2, lora_alpha=16.0, bias_u=config.bias_update_rate,
    )
    assert not torch.equal(theirs, torch.zeros(8, dtype=DT))


def test_flylora_budget_row_at_the_default_study():
    method = get_method("flylora")
    assert [v.tag for v in method.variants(DEFAULT, {})] == ["G24"]
    config = method.solve(DEFAULT, Variant(24, "G24"), SMOLLM2_TOP, {})
    assert (config.rank, config.top_k) == (24, 4)
    count = method.count_model(config, SMOLLM2_TOP)
    d_out = sum(s.d_out for s in SMOLLM2_TOP)
    assert (count.total, count.activated, count.router) == (24 * d_out, 4 * d_out, 0)
    assert count.total == 124_416  # LoRA rank 24: 244,224 (A frozen: -49.1%)
    with pytest.raises(BudgetError, match="runs at G = R = 24"):
        method.solve(DEFAULT, Variant(6, "G6"), SMOLLM2_TOP, {})


# ======================================================================================
# GOAT — Facico/GOAT-PEFT (tests/oracles/goat.py)
# ======================================================================================


@pytest.mark.parametrize("experts,rank,top_k,seed", [(4, 2, 2, 0), (3, 2, 1, 0), (6, 1, 2, 2)])
def test_goat_passes_the_layer_checks(experts, rank, top_k, seed):
    # seed 2 for (6, 1, 2): seed 0 draws two router logits 8e-4 apart, a selection that
    # bf16 rounding flips (a tie of the test data, not of the layer)
    method = get_method("goat_moe")
    check_layer(method, method.make_config(num_experts=experts, expert_rank=rank, top_k=top_k, alpha=8), seed=seed)


def goat_layer(experts=3, rank=2, top_k=2, alpha=16.0, seed=0, move=True):
    """Our layer in float64 with a random router and, with ``move``, A and B moved away from
    their SVD start (as after training)."""
    method = get_method("goat_moe")
    config = method.make_config(num_experts=experts, expert_rank=rank, top_k=top_k, alpha=alpha)
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(DT)
    layer = method.make_layer(base, config).to(DT)
    gen = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=gen, dtype=DT) * 0.6)
        if move:
            layer.lora_A.add_(torch.randn(layer.lora_A.shape, generator=gen, dtype=DT) * 0.1)
            layer.lora_B.add_(torch.randn(layer.lora_B.shape, generator=gen, dtype=DT) * 0.1)
    return layer, config


def experts_of(A: torch.Tensor, B: torch.Tensor, E: int, r: int):
    return [A[e * r:(e + 1) * r] for e in range(E)], [B[:, e * r:(e + 1) * r] for e in range(E)]


def test_goat_init_is_the_authors_svd_segments():
    layer, _config = goat_layer(experts=3, rank=2, move=False)
    W = layer.base_layer.weight.detach().float()
    As, Bs, scaling, _ = goat_ref.goat_init(W, lora_rank=6, num_experts=3, lora_alpha=16.0, init_cof=1 / 3)
    assert scaling == layer.scaling == 16.0 / 2
    torch.testing.assert_close(layer.lora_A.float(), torch.cat(As), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.lora_B.float(), torch.cat(Bs, dim=1), rtol=1e-5, atol=1e-6)
    assert torch.equal(layer.goat_A0, layer.lora_A.detach()) and torch.equal(layer.goat_B0, layer.lora_B.detach())


def test_goat_differs_start_is_the_base_model():
    """Theirs at step 0: W0 - (1/E)·s·B A plus the routed experts, not the base model's output;
    ours: exactly the base model's."""
    layer, _config = goat_layer(move=False)
    x = tokens()
    W = layer.base_layer.weight
    As, Bs, scaling, new_W = goat_ref.goat_init(W, lora_rank=6, num_experts=3, lora_alpha=16.0, init_cof=1 / 3)
    theirs, _ = goat_ref.goat_forward(x, new_W, layer.base_layer.bias, layer.router.weight, As, Bs, top_k=2, scaling=scaling)
    with torch.no_grad():
        assert torch.equal(layer(x), layer.base_layer(x))
    assert not torch.allclose(theirs, layer.base_layer(x), atol=1e-6)


@pytest.mark.parametrize("top_k", [2, 3])
def test_goat_matches_the_authors_forward_minus_the_routed_start(top_k):
    """With A and B moved: ours = their forward on the unmodified W0 minus their routed experts
    at the start weights (same gates); gradients of x, every A_e, B_e and the router equal, and
    the balancing loss is theirs times aux_loss_weight."""
    layer, config = goat_layer(top_k=top_k)
    layer.train()
    E, r = 3, 2
    x = tokens()
    xo, Ao, Bo, Wg = leaf(x), leaf(layer.lora_A), leaf(layer.lora_B), leaf(layer.router.weight)
    As, Bs = experts_of(Ao, Bo, E, r)
    A0s, B0s = experts_of(layer.goat_A0, layer.goat_B0, E, r)
    moved, loss = goat_ref.goat_forward(xo, layer.base_layer.weight, layer.base_layer.bias, Wg, As, Bs,
                                        top_k=top_k, scaling=layer.scaling)
    start, _ = goat_ref.goat_forward(xo, torch.zeros_like(layer.base_layer.weight), None, Wg, A0s, B0s,
                                     top_k=top_k, scaling=layer.scaling)
    ref = moved - start
    xs = leaf(x)
    ours = layer(xs)
    close(ours, ref)
    # the toolkit's load shares are float32 on purpose (as tests/test_oracles.py's close32)
    torch.testing.assert_close(layer.aux_loss(), config.aux_loss_weight * loss, rtol=1e-6, atol=1e-9)
    ours_g = upstream_grads(ours, [xs, layer.lora_A, layer.lora_B, layer.router.weight])
    ref_g = upstream_grads(ref, [xo, Ao, Bo, Wg])
    for a, b in zip(ours_g, ref_g):
        close(a, b)


def test_goat_differs_top1_gate():
    """k = 1: their renormalised gate is the constant 1; ours is the selected expert's
    full-softmax probability (so the task loss trains the router)."""
    layer, _config = goat_layer(top_k=1)
    x = tokens()
    E, r = 3, 2
    As, Bs = experts_of(layer.lora_A, layer.lora_B, E, r)
    A0s, B0s = experts_of(layer.goat_A0, layer.goat_B0, E, r)
    W = layer.base_layer.weight
    with torch.no_grad():
        moved, _ = goat_ref.goat_forward(x, W, layer.base_layer.bias, layer.router.weight, As, Bs, top_k=1, scaling=layer.scaling)
        start, _ = goat_ref.goat_forward(x, torch.zeros_like(W), None, layer.router.weight, A0s, B0s, top_k=1, scaling=layer.scaling)
        ours = layer(x)
        assert not torch.allclose(ours, moved - start)
        # the mapping: their experts' delta times our gate p_sel
        p = torch.softmax(F.linear(x, layer.router.weight), dim=-1).max(-1, keepdim=True).values
        close(ours - layer.base_layer(x), p * (moved - start - layer.base_layer(x)))


def test_goat_budget_rows_at_the_default_study():
    method = get_method("goat_moe")
    expected = {6: (6, 4, 1, 274_176), 12: (12, 2, 2, 304_128), 24: (24, 1, 4, 364_032)}
    for g, (E, r, k, total) in expected.items():
        config = method.solve(DEFAULT, Variant(g, f"G{g}"), SMOLLM2_TOP, {})
        assert (config.num_experts, config.expert_rank, config.top_k) == (E, r, k)
        count = method.count_model(config, SMOLLM2_TOP)
        assert count.total == total and count.total - count.router == lora_count(24, SMOLLM2_TOP)
    narrow = [TargetShape("m.layers.0.x", 8, 4)]  # 4 singular values cannot give 6 segments
    with pytest.raises(BudgetError, match=r"goat_moe: module 'm.layers.0.x' \(8 -> 4\) has 4 singular values"):
        method.solve(DEFAULT, Variant(6, "G6"), narrow, {})


# ======================================================================================
# All three in a model: exact start, training moves the loss, saved state reloads
# ======================================================================================

REQUEST_TINY = BudgetRequest(total_rank=8, active_rank=2, granularities=(4, 8), alpha=16)


def top_layer_targets(model) -> list[TargetShape]:
    return [
        TargetShape(name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.startswith("model.layers.1.")
    ]


@pytest.mark.parametrize("name,tag", [("gralora", "k4"), ("flylora", "G8"), ("goat_moe", "G4")])
def test_in_a_model_start_training_and_reload(name, tag, tiny_llama):
    method = get_method(name)
    targets = top_layer_targets(tiny_llama)
    assert len(targets) == 7
    variant = next(v for v in method.variants(REQUEST_TINY, {}) if v.tag == tag)
    config = method.solve(REQUEST_TINY, variant, targets, {})
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_logits = tiny_llama(ids).logits
    handle = apply_method(tiny_llama, method, config, targets)
    assert handle.trainable_numel() == method.count_model(config, targets).total
    with torch.no_grad():
        assert torch.equal(tiny_llama(ids).logits, base_logits)  # exact start
    tiny_llama.train()
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        with handle.token_mask(torch.ones(2, 9, dtype=torch.bool)):
            loss = tiny_llama(ids, labels=ids).loss
            aux = handle.aux_loss()
        (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad()
        handle.after_optimizer_step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    tiny_llama.eval()
    with torch.no_grad():
        trained = tiny_llama(ids).logits
    assert not torch.equal(trained, base_logits)
    state = handle.adapter_state_dict()
    fresh = make_tiny_llama()
    fresh_handle = apply_method(fresh, method, config, targets)
    fresh_handle.load_state(state)
    fresh.eval()
    with torch.no_grad():
        close(fresh(ids).logits.double(), trained.double())


def test_gralora_exports_a_peft_adapter_that_peft_loads_and_merges(tmp_path):
    """``export_peft`` writes peft's own folder: ``PeftModel.from_pretrained`` on the base
    model gives the harness model's logits, and so does peft's ``merge_and_unload``."""
    from peft import PeftModel

    method = get_method("gralora")
    model = make_tiny_llama()
    targets = top_layer_targets(model)
    config = method.solve(REQUEST_TINY, Variant(2, "k2"), targets, {})
    handle = apply_method(model, method, config, targets)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    ids = torch.randint(0, 97, (2, 9), generator=gen)
    with torch.no_grad():
        ours = model(ids).logits
    method.export_peft(config, handle.adapter_state_dict(), targets, tmp_path / "peft", "tiny")
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), str(tmp_path / "peft"))
    peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(ids).logits, ours, rtol=1e-5, atol=1e-5)
        merged = peft_model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, ours, rtol=1e-4, atol=1e-4)
