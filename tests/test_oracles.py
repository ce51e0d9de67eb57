"""Our layers held against independent references of each method (``tests/oracles``).

For every method whose authors (or a widely used reference implementation) published
code, ``tests/oracles/<method>.py`` re-implements that code's forward (and update rules)
in plain torch; for the others it evaluates the paper's equations expert by expert. The
tests copy one set of random weights into both (our stacked ``A``/``B``/router mapped to
the per-expert tensors of the reference) and compare, in float64, the outputs and the
gradients with respect to every parameter and the input, and SMoRA's selection bias
after optimizer steps.

Where our implementation deliberately differs from the authors' code, the test shows
the difference and then the documented mapping under which both agree exactly; each
such test says so in its name (``..._differs_...``). ``docs/fidelity.md`` lists them.
"""

from __future__ import annotations

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.oracles import hydralora as hydra_ref
from tests.oracles import loramoe as loramoe_ref
from tests.oracles import malora as malora_ref
from tests.oracles import mixlora as mixlora_ref
from tests.oracles import moa as moa_ref
from tests.oracles import mode as mode_ref
from tests.oracles import mola as mola_ref
from tests.oracles import molora as molora_ref
from tests.oracles import multilora as multilora_ref
from tests.oracles import sira as sira_ref
from tests.oracles import smora as smora_ref


def method_module(name: str):
    """Our method module: ``methods.<name>`` (the top-level package of built-ins)."""
    return importlib.import_module(f"methods.{name}")


D_IN, D_OUT = 10, 7
BATCH, SEQ = 3, 5  # 15 tokens: N·k/E is never a whole number below, so no count ties the mean
DT = torch.float64
PATHS = ["dense", "sparse"]


def build(name: str, cls_name: str, seed: int = 0, router_std: float = 0.6, **values):
    """Our layer for ``name`` around a random frozen ``nn.Linear``, as the method makes it
    (``make_config`` + ``make_layer``, so the method's own scaling), in float64 and with
    every adapter weight random (B too, so outputs and all gradients are non-zero)."""
    method = getattr(method_module(name), cls_name)()
    config = method.make_config(**values)
    gen = torch.Generator().manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT)
    layer = method.make_layer(base, config).to(DT)
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            std = router_std if pname.startswith("router") else 0.3
            p.copy_(torch.randn(p.shape, generator=gen, dtype=DT) * std)
    return layer, method, config


def tokens(seed: int = 1, batch: int = BATCH, seq: int = SEQ, d: int = D_IN) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, seq, d, generator=gen, dtype=DT)


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def blocks_A(layer, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Stacked ``A`` (``E·r x d``) -> a leaf ``(E, r, d)``: expert ``e`` is rows ``e·r..``."""
    w = layer.lora_A if weight is None else weight
    return leaf(w.view(layer.num_experts, layer.expert_rank, -1))


def blocks_B(layer) -> torch.Tensor:
    """Stacked ``B`` (``d_out x E·r``) -> a leaf ``(E, d_out, r)``: expert ``e`` is columns ``e·r..``."""
    E, r = layer.num_experts, layer.expert_rank
    return leaf(layer.lora_B.view(layer.out_features, E, r).permute(1, 0, 2))


def grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 7) -> list[torch.Tensor]:
    """Gradients of ``<out, g>`` for a fixed random upstream ``g`` (same for both sides)."""
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    found = torch.autograd.grad((out * g).sum(), inputs, allow_unused=True, retain_graph=True)
    # an expert no token selected: the reference's leaf is unused (None), ours gets zeros
    return [torch.zeros_like(t) if d is None else d for t, d in zip(inputs, found)]


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, **kw)


def close32(a, b):
    """For quantities our code computes in float32 on purpose (the load shares of the
    auxiliary loss, MoA's task-label cross-entropy): agreement to float32 precision."""
    torch.testing.assert_close(a.to(DT), b.to(DT), rtol=1e-6, atol=1e-8)


def not_close(a, b) -> None:
    assert not torch.allclose(a, b, rtol=1e-6, atol=1e-9), "expected a difference, found none"


def as_B_blocks(grad_B: torch.Tensor, E: int, r: int) -> torch.Tensor:
    return grad_B.view(grad_B.shape[0], E, r).permute(1, 0, 2)


# ======================================================================================
# SMoRA — official code: StyxXuan/smora, srmole/layer.py (tests/oracles/smora.py)
# ======================================================================================

SMORA_SETTINGS = [  # (E experts, expert rank r = the authors' rank_partition, top-k)
    (8, 1, 3),  # the paper's form: every rank an expert
    (4, 2, 2),  # rank blocks: rank_partition = 2, activate_r = k·r = 4
]


def smora_reference(layer, x, bias_per_rank, *, training, **kw):
    r = layer.expert_rank
    leaves = {
        "x": leaf(x),
        "A": leaf(layer.lora_A),
        "B": leaf(layer.lora_B),
        "W": leaf(layer.router.weight),
    }
    out, new_bias = smora_ref.srmole_forward(
        leaves["x"],
        layer.base_layer.weight,
        layer.base_layer.bias,
        leaves["A"],
        leaves["B"],
        leaves["W"],
        bias_per_rank,
        activate_r=layer.top_k * r,
        rank_partition=r,
        lora_alpha=layer.config.alpha,
        training=training,
        **kw,
    )
    return out, new_bias, leaves


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("E,r,k", SMORA_SETTINGS)
def test_smora_matches_authors_code_at_zero_bias(E, r, k, training, path):
    layer, method, config = build(
        "smora", "SMoRA", num_experts=E, expert_rank=r, top_k=k, path=path
    )
    assert method.scaling(config) == config.alpha / (k * r)  # the authors' alpha / activate_r
    layer.train(training)
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    ref, _, lv = smora_reference(layer, x, torch.zeros(E * r, dtype=DT), training=training)
    close(out, ref)
    ours = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    theirs = grads(ref, [lv["x"], lv["A"], lv["B"], lv["W"]])
    for a, b in zip(ours, theirs):
        close(a, b)


@pytest.mark.parametrize("E,r,k", SMORA_SETTINGS)
def test_smora_bias_updates_equal_after_each_step(E, r, k):
    """One forward per optimizer step (the harness's loop): after every step our block
    bias, repeated over the block's ranks, equals the authors' per-rank bias, and the
    routing both make from it stays identical. The rate is raised to 2^-5 so the bias
    changes the selection within a few steps (a power of two: our step is taken in
    float32, the counts' dtype, and this keeps it exact in the float64 comparison)."""
    rate = 2.0**-5
    layer, _, _ = build(
        "smora", "SMoRA", num_experts=E, expert_rank=r, top_k=k, bias_update_rate=rate
    )
    layer.train()
    theirs = torch.zeros(E * r, dtype=DT)
    steered = False
    for step in range(8):
        x = tokens(seed=100 + step)
        with torch.no_grad():
            scores = torch.sigmoid(layer.router(x))
            unbiased = scores.topk(k, dim=-1).indices.sort(-1).values
            biased = (scores + layer.selection_bias).topk(k, dim=-1).indices.sort(-1).values
            steered |= not torch.equal(unbiased, biased)
            out = layer(x)
            # same selection every step; the outputs agree once the reference's gate reads
            # the raw scores (the gate difference is the next test)
            ref_gate_s, theirs, _ = smora_reference(
                layer, x, theirs, training=True, bias_update_rate=rate, gate_includes_bias=False
            )
        layer.after_optimizer_step()
        close(layer.selection_bias.repeat_interleave(r), theirs)
        close(out, ref_gate_s)
    assert steered  # the bias changed some token's selection, and both still agreed


@pytest.mark.parametrize("E,r,k", SMORA_SETTINGS)
def test_smora_differs_gate_includes_bias(E, r, k):
    """Difference 1: the authors' gate normalises the *biased* scores s + b (the values
    top-k returned); ours, as our module docstring writes it (methods/smora.py) (and as
    DeepSeek-V3 uses its bias: for selection only), normalises the raw s. Equal at b = 0 (above); with b != 0 the outputs and the
    router gradient differ; with the reference's gate reading s, both agree exactly."""
    layer, _, _ = build("smora", "SMoRA", num_experts=E, expert_rank=r, top_k=k)
    bias = torch.randn(E, generator=torch.Generator().manual_seed(3), dtype=DT) * 0.05
    layer.selection_bias.copy_(bias)
    layer.eval()
    x = tokens()
    out = layer(x)
    b_rank = bias.repeat_interleave(r)
    authors, _, lv = smora_reference(layer, x, b_rank, training=False)
    not_close(out, authors)
    mapped, _, lv = smora_reference(layer, x, b_rank, training=False, gate_includes_bias=False)
    close(out, mapped)
    ours = grads(out, [layer.lora_A, layer.lora_B, layer.router.weight])
    for a, b in zip(ours, grads(mapped, [lv["A"], lv["B"], lv["W"]])):
        close(a, b)


@pytest.mark.parametrize("E,r", [(6, 1), (4, 2)])
def test_smora_differs_top1_uses_raw_score(E, r):
    """Difference 2: with one active block the authors' normalised gate is the constant
    1 (``s / s``), so their router gets no gradient from the output and never learns;
    ours uses the raw score s_j (methods/smora.py). Our delta is exactly s_j times theirs."""
    layer, _, _ = build("smora", "SMoRA", num_experts=E, expert_rank=r, top_k=1)
    layer.eval()
    x = tokens()
    out = layer(x)
    authors, _, lv = smora_reference(layer, x, torch.zeros(E * r, dtype=DT), training=False)
    base = layer.base_layer(x)
    not_close(out, authors)
    s_sel = torch.sigmoid(layer.router(x)).max(dim=-1, keepdim=True).values
    close(out - base, s_sel * (authors - base))
    (router_grad,) = grads(authors, [lv["W"]])
    assert router_grad.abs().max() < 1e-12  # the authors' router is untrained at top-1
    (ours_router_grad,) = grads(out, [layer.router.weight])
    assert ours_router_grad.abs().max() > 1e-3


def test_smora_differs_padding_in_bias_counts():
    """Difference 3: the authors count every token of the micro-batch, padding included
    (no mask reaches the layer); ours counts real tokens only. Padding tokens built to
    select the least-loaded block push it above the mean in the authors' count, so the
    two updates have opposite signs there; counted over the real tokens only, the
    authors' rule gives exactly our update."""
    E, r, k = 8, 1, 3
    layer, _, _ = build(
        "smora", "SMoRA", num_experts=E, expert_rank=r, top_k=k, bias_update_rate=2.0**-6
    )
    n_real, n_pad = 15, 30
    real = tokens(seed=5, batch=1, seq=n_real)
    with torch.no_grad():
        scores = torch.sigmoid(layer.router(real))
        counts = torch.bincount(scores.topk(k, dim=-1).indices.reshape(-1), minlength=E)
    target = int(counts.argmin())
    assert counts[target] < n_real * k / E
    # a padding vector whose logit is +30 for the target block and -30 for all others
    want = torch.full((E,), -30.0, dtype=DT)
    want[target] = 30.0
    pad = torch.linalg.lstsq(layer.router.weight.detach(), want.unsqueeze(-1)).solution.squeeze(-1)
    x = torch.cat([real, pad.expand(1, n_pad, D_IN)], dim=1)
    layer.token_mask = torch.arange(n_real + n_pad) < n_real
    layer.train()
    with torch.no_grad():
        layer(x)
    layer.after_optimizer_step()
    zero = torch.zeros(E * r, dtype=DT)
    _, authors, _ = smora_reference(layer, x, zero, training=True, bias_update_rate=2.0**-6)
    assert authors[target] < 0 < layer.selection_bias[target]
    _, real_only, _ = smora_reference(layer, real, zero, training=True, bias_update_rate=2.0**-6)
    close(layer.selection_bias, real_only)


def test_smora_differs_update_cadence_with_accumulation():
    """Difference 4: the authors update the bias inside every training forward, i.e.
    once per micro-batch (16 per optimizer step in their configs: micro-batch 8,
    gradient accumulation 16); ours once per optimizer step, from the last forward's
    counts. With one forward per step (our training loop) both agree (above); with two
    forwards before a step they do not; eval forwards update neither."""
    E, r, k = 8, 1, 3
    rate = 2.0**-6
    layer, _, _ = build(
        "smora", "SMoRA", num_experts=E, expert_rank=r, top_k=k, bias_update_rate=rate
    )
    x1, x2 = tokens(seed=11), tokens(seed=12)
    layer.eval()
    with torch.no_grad():
        layer(x1)
    layer.after_optimizer_step()
    assert torch.count_nonzero(layer.selection_bias) == 0
    _, unchanged, _ = smora_reference(layer, x1, torch.zeros(E, dtype=DT), training=False)
    assert torch.count_nonzero(unchanged) == 0

    layer.train()
    with torch.no_grad():
        layer(x1)
        layer(x2)
    layer.after_optimizer_step()
    b = torch.zeros(E, dtype=DT)
    _, b, _ = smora_reference(layer, x1, b, training=True, bias_update_rate=rate)
    _, b, _ = smora_reference(layer, x2, b, training=True, bias_update_rate=rate)
    not_close(layer.selection_bias, b)
    _, last_only, _ = smora_reference(
        layer, x2, torch.zeros(E, dtype=DT), training=True, bias_update_rate=rate
    )
    close(layer.selection_bias, last_only)


def test_smora_bias_count_equal_to_mean_is_not_moved():
    """A block whose count equals the mean is left alone (sign 0), as by the authors'
    integer ``bincount``. E = 6, k = 3, 12 tokens: per-block counts [7, 2, 6, 7, 7, 7],
    mean 6; block 2 sits exactly at the mean. Routing is forced with a scaled identity
    router and +-1 inputs. (At commit 3b48187 our counts were rebuilt as float32 share x
    tokens x k, which made block 2's count 6.0 against a mean of 6.0000003 and moved its
    bias by +gamma; counting real tokens directly, as the code now does, fixed it.)"""
    pattern = [[5, 2, 3], [3, 5, 4], [1, 3, 2], [2, 3, 0], [0, 1, 3], [3, 5, 4],
               [3, 4, 2], [2, 4, 0], [4, 0, 5], [4, 0, 5], [5, 2, 0], [5, 0, 4]]  # fmt: skip
    E, k = 6, 3
    method = method_module("smora").SMoRA()
    config = method.make_config(num_experts=E, expert_rank=1, top_k=k, bias_update_rate=1.0)
    layer = method.make_layer(nn.Linear(E, 4), config).to(DT)
    with torch.no_grad():
        layer.router.weight.copy_(10 * torch.eye(E, dtype=DT))
    x = -torch.ones(1, len(pattern), E, dtype=DT)
    for n, sel in enumerate(pattern):
        x[0, n, sel] = 1.0
    layer.token_mask = torch.ones(len(pattern), dtype=torch.bool)  # as in training
    layer.train()
    with torch.no_grad():
        layer(x)
    layer.after_optimizer_step()
    _, authors, _ = smora_reference(
        layer, x, torch.zeros(E, dtype=DT), training=True, bias_update_rate=1.0
    )
    assert authors.tolist() == [-1.0, 1.0, 0.0, -1.0, -1.0, -1.0]
    close(layer.selection_bias, authors)


# ======================================================================================
# MoLoRA — official code: for-ai/parameter-efficient-moe, src/molora.py (JAX)
# ======================================================================================


def molora_reference(layer, x, **kw):
    """The for-ai module on our weights, in its layouts: A (E, d_in, r), B (E, r, d_out),
    router kernel (d_in, E). Returns (full output, leaves in our per-expert layout)."""
    lv = {"x": leaf(x), "A": blocks_A(layer), "B": blocks_B(layer), "W": leaf(layer.router.weight)}
    delta = molora_ref.molora_delta(
        lv["x"],
        lv["A"].transpose(1, 2),
        lv["B"].transpose(1, 2),
        lv["W"].t(),
        rank=layer.expert_rank,
        alpha=layer.config.alpha,
        **kw,
    )
    return layer.base_layer(lv["x"]) + delta, lv


def check_molora_grads(layer, out, xo, ref, lv):
    E, r = layer.num_experts, layer.expert_rank
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, rA, rB, rW = grads(ref, [lv["x"], lv["A"], lv["B"], lv["W"]])
    close(gx, rx)
    close(gA.view(E, r, -1), rA)
    close(as_B_blocks(gB, E, r), rB)
    close(gW, rW)


def test_molora_dense_matches_authors_code():
    layer, method, config = build("molora", "MoLoRA", num_experts=4, expert_rank=2, alpha=16.0)
    assert method.scaling(config) == 16.0 / 2  # the authors' alpha / rank, alpha = 16
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    ref, lv = molora_reference(layer, x)
    close(out, ref)
    check_molora_grads(layer, out, xo, ref, lv)


@pytest.mark.parametrize("path", PATHS)
def test_molora_top1_matches_authors_top_k_mask(path):
    """k = 1: the authors' masked (not renormalised) full-softmax probability is exactly
    our Switch-style top-1 gate."""
    layer, _, _ = build(
        "molora", "MoLoRA", num_experts=4, expert_rank=2, top_k=1, sparse=True, path=path
    )
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    ref, lv = molora_reference(layer, x, top_k=1)
    close(out, ref)
    check_molora_grads(layer, out, xo, ref, lv)


@pytest.mark.parametrize("path", PATHS)
def test_molora_differs_top_k_renormalised(path):
    """Difference: the authors' optional top-k keeps the k full-softmax probabilities
    without renormalising (they sum to < 1); our ``sparse`` form takes the softmax over
    the selected logits, i.e. those probabilities divided by their sum. Renormalising the
    reference's masked probabilities gives ours exactly (MixLoRA's form, below)."""
    layer, _, _ = build(
        "molora", "MoLoRA", num_experts=4, expert_rank=2, top_k=2, sparse=True, path=path
    )
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    authors, _ = molora_reference(layer, x, top_k=2)
    not_close(out, authors)
    ref, lv = molora_reference(layer, x, top_k=2, renormalize=True)
    close(out, ref)
    check_molora_grads(layer, out, xo, ref, lv)


# ======================================================================================
# HydraLoRA — official code: Clin0212/HydraLoRA, peft/tuners/lora.py (shared A, N heads)
# ======================================================================================


def test_hydralora_equals_molora_with_tied_A():
    """HydraLoRA is dense MoLoRA with every expert's A the same matrix: with our A blocks
    tied, outputs match, the gradient of Hydra's shared A is the sum of our blocks'
    gradients, and each head's B and the router match."""
    E, r = 4, 2
    layer, _, _ = build("molora", "MoLoRA", num_experts=E, expert_rank=r, alpha=32.0)
    shared = torch.randn(r, D_IN, generator=torch.Generator().manual_seed(9), dtype=DT) * 0.3
    with torch.no_grad():
        layer.lora_A.copy_(shared.repeat(E, 1))
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    A, W = leaf(shared), leaf(layer.router.weight)
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(E)]
    xr = leaf(x)
    ref = hydra_ref.hydralora_forward(
        xr, layer.base_layer.weight, layer.base_layer.bias, A, Bs, W,
        lora_alpha=32.0, r=r, softmax_dtype=DT,
    )  # fmt: skip
    close(out, ref)
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, rA, rW, *rBs = grads(ref, [xr, A, W, *Bs])
    close(gx, rx)
    close(gA.view(E, r, D_IN).sum(0), rA)
    close(as_B_blocks(gB, E, r), torch.stack(rBs))
    close(gW, rW)


@pytest.mark.parametrize("path", PATHS)
def test_hydralora_equals_malora_with_identity_P(path):
    """MALoRA with r_s = r_e, every P_e = I and k = E (softmax over all) is HydraLoRA:
    S plays Hydra's shared A (same gradient), B and router match."""
    E, r = 4, 2
    layer, _, _ = build(
        "malora", "MALoRA", num_experts=E, expert_rank=r, shared_rank=r, top_k=E,
        alpha=32.0, path=path,
    )  # fmt: skip
    with torch.no_grad():
        layer.shared_P.copy_(torch.eye(r, dtype=DT).repeat(E, 1))
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    A, W = leaf(layer.shared_S), leaf(layer.router.weight)
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(E)]
    xr = leaf(x)
    ref = hydra_ref.hydralora_forward(
        xr, layer.base_layer.weight, layer.base_layer.bias, A, Bs, W,
        lora_alpha=32.0, r=r, softmax_dtype=DT,
    )  # fmt: skip
    close(out, ref)
    gx, gS, gB, gW = grads(out, [xo, layer.shared_S, layer.lora_B, layer.router.weight])
    rx, rA, rW, *rBs = grads(ref, [xr, A, W, *Bs])
    close(gx, rx)
    close(gS, rA)
    close(as_B_blocks(gB, E, r), torch.stack(rBs))
    close(gW, rW)


# ======================================================================================
# MixLoRA — official code: TUDB-Labs/MixLoRA, mixlora/model.py (top-k, renormalised)
# ======================================================================================


def mixlora_reference(layer, x, k):
    E, r = layer.num_experts, layer.expert_rank
    xr, W = leaf(x), leaf(layer.router.weight)
    As = [leaf(layer.lora_A[e * r : (e + 1) * r]) for e in range(E)]
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(E)]
    out = mixlora_ref.mixlora_linear_forward(
        xr, layer.base_layer.weight, layer.base_layer.bias, W, As, Bs,
        top_k=k, lora_alpha=layer.config.alpha, r=r,
    )  # fmt: skip
    return out, xr, W, As, Bs


@pytest.mark.parametrize("path", PATHS)
def test_mixlora_routing_equals_sparse_molora(path):
    E, r, k = 4, 2, 2
    layer, _, _ = build(
        "molora", "MoLoRA", num_experts=E, expert_rank=r, top_k=k, sparse=True, path=path
    )
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    ref, xr, W, As, Bs = mixlora_reference(layer, x, k)
    close(out, ref)
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, rW, *rest = grads(ref, [xr, W, *As, *Bs])
    close(gx, rx)
    close(gW, rW)
    close(gA.view(E, r, D_IN), torch.stack(rest[:E]))
    close(as_B_blocks(gB, E, r), torch.stack(rest[E:]))


def test_mixlora_differs_top1_gate():
    """Difference: at k = 1 MixLoRA's renormalised weight is the constant 1 (its router
    learns only from the auxiliary loss); ours keeps the chosen expert's full-softmax
    probability p (Switch). Our delta is exactly p times MixLoRA's."""
    E, r = 4, 2
    layer, _, _ = build("molora", "MoLoRA", num_experts=E, expert_rank=r, top_k=1, sparse=True)
    x = tokens()
    out = layer(x)
    ref, _, W, _, _ = mixlora_reference(layer, x, 1)
    not_close(out, ref)
    base = layer.base_layer(x)
    p = torch.softmax(layer.router(x), dim=-1).max(dim=-1, keepdim=True).values
    close(out - base, p * (ref - base))
    (rW,) = grads(ref, [W])
    assert rW.abs().max() < 1e-12


def sira_aux_setup(k, seed=0):
    E, r = 6, 1
    layer, _, _ = build(
        "sira", "SiRA", seed=seed, num_experts=E, expert_rank=r, top_k=k,
        capacity_factor=0.75, expert_dropout=0.0, aux_loss_weight=1.0,
    )  # fmt: skip
    x = tokens(seed=4)
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 4:] = False
    layer.token_mask = mask.reshape(-1)
    layer.train()
    return layer, x, mask


@pytest.mark.parametrize("k", [1, 2, 3])
def test_aux_loss_differs_from_mixtral_by_factor_k(k):
    """Difference: Mixtral's / MixLoRA's loss sums the token shares over the k choice
    ranks (sum f = k); ours (Switch's eq. 4 generalised) uses the share of the T·k
    assignments (sum f = 1). Same masking of padding. Mixtral's loss = k x ours exactly,
    gradient included; at k = 1 the two coincide."""
    layer, x, mask = sira_aux_setup(k)
    layer(x)
    ours = layer.aux_loss()
    logits = layer.router(x.reshape(-1, D_IN))
    mixtral = mixlora_ref.mixtral_load_balancing_loss([logits], 6, k, mask.long())
    close32(mixtral, k * ours)
    (g_ours,) = grads(ours, [layer.router.weight])
    (g_mix,) = grads(mixtral, [layer.router.weight])
    close32(g_mix, k * g_ours)


# ======================================================================================
# SiRA — no official code: the paper's equations (tests/oracles/sira.py)
# ======================================================================================


def sira_reference(layer, x, **kw):
    E, r = layer.num_experts, layer.expert_rank
    xr, W = leaf(x.reshape(-1, D_IN)), leaf(layer.router.weight)
    As = [leaf(layer.lora_A[e * r : (e + 1) * r]) for e in range(E)]
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(E)]
    delta = sira_ref.sira_delta(
        xr, As, Bs, W, top_k=layer.top_k, alpha=layer.config.alpha, r=r, **kw
    )
    out = (layer.base_layer(xr) + delta).view(*x.shape[:-1], -1)
    return out, [xr, W, *As, *Bs]


def check_sira_grads(layer, out, xo, ref, leaves):
    E, r = layer.num_experts, layer.expert_rank
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, rW, *rest = grads(ref, leaves)
    close(gx.reshape(-1, D_IN), rx)
    close(gW, rW)
    close(gA.view(E, r, -1), torch.stack(rest[:E]))
    close(as_B_blocks(gB, E, r), torch.stack(rest[E:]))


def sira_layer(path="dense", k=2, **values):
    defaults = {"num_experts": 6, "expert_rank": 2, "top_k": k, "path": path}
    return build("sira", "SiRA", **{**defaults, **values})[0]


@pytest.mark.parametrize("path", PATHS)
def test_sira_eval_matches_paper_topk_softmax(path):
    """Eval: top-k, softmax over the selected logits, no capacity, no expert dropout."""
    layer = sira_layer(path)
    layer.eval()
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    ref, leaves = sira_reference(layer, x)
    close(out, ref)
    check_sira_grads(layer, out, xo, ref, leaves)


@pytest.mark.parametrize("path", PATHS)
def test_sira_training_capacity_matches_gshard_priority(path):
    """Training with capacity ceil(cf·k·T/E) (T real tokens), GShard's order, padding
    neither routed nor counted; cf = 0.5 so that assignments are dropped."""
    layer = sira_layer(path, capacity_factor=0.5, expert_dropout=0.0, aux_loss_weight=0.0)
    x = tokens()
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[1, 2:] = False
    layer.token_mask = mask.reshape(-1)
    layer.train()
    xo = leaf(x)
    out = layer(xo)
    logits = layer.router(x.reshape(-1, D_IN)).detach()
    _, _, kept = sira_ref.sira_routing(
        logits, top_k=2, capacity_factor=0.5, token_mask=mask.reshape(-1)
    )
    real_kept = [kept[n][j] for n in range(len(kept)) if mask.reshape(-1)[n] for j in range(2)]
    assert not all(real_kept)  # capacity binds
    ref, leaves = sira_reference(layer, x, capacity_factor=0.5, token_mask=mask.reshape(-1))
    close(out, ref)  # padding rows included: neither adds an adapter output there
    check_sira_grads(layer, out, xo, ref, leaves)


def test_sira_capacity_in_eval_option():
    layer = sira_layer(capacity_factor=0.5, capacity_in_eval=True)
    layer.eval()
    x = tokens()
    out = layer(x)
    ref, _ = sira_reference(layer, x, capacity_factor=0.5)
    close(out, ref)
    no_cap, _ = sira_reference(layer, x)
    not_close(out, no_cap)


def test_sira_expert_dropout_on_gates_in_training_only():
    """Expert dropout: inverted dropout on the (N, k) gate matrix in training (the same
    generator draw gives the same keep mask), none in eval."""
    p, seed = 0.4, 1234
    layer = sira_layer(capacity_factor=100.0, expert_dropout=p, aux_loss_weight=0.0)
    x = tokens()
    n = x.shape[0] * x.shape[1]
    torch.manual_seed(seed)
    keep = (F.dropout(torch.ones(n, 2, dtype=DT), p, True) != 0).to(DT)
    assert 0 < keep.sum() < keep.numel()
    layer.train()
    torch.manual_seed(seed)
    out = layer(x)
    ref, _ = sira_reference(layer, x, capacity_factor=100.0, dropout_keep=keep, dropout_p=p)
    close(out, ref)
    layer.eval()
    close(layer(x), sira_reference(layer, x)[0])


def test_sira_differs_top1_gate():
    """Difference: with k = 1 the paper's softmax over the selected logit is the constant
    1 (the router would learn from the auxiliary loss only); ours uses the selected
    expert's full-softmax probability (Switch). The reference with that top-1 rule agrees."""
    layer = sira_layer(k=1)
    layer.eval()
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    paper, _ = sira_reference(layer, x)
    not_close(out, paper)
    ref, leaves = sira_reference(layer, x, switch_top1=True)
    close(out, ref)
    check_sira_grads(layer, out, xo, ref, leaves)


@pytest.mark.parametrize("k", [1, 2])
def test_sira_aux_loss_is_switch_loss(k):
    """``aux_loss_weight · E · sum_e f_e P_e`` over real tokens, f from the pre-capacity
    choice (capacity 0.75 drops assignments here, and f does not see that)."""
    layer, x, mask = sira_aux_setup(k)
    layer(x)
    ours = layer.aux_loss()
    W = leaf(layer.router.weight)
    ref = sira_ref.switch_aux_loss(
        F.linear(x.reshape(-1, D_IN), W), top_k=k, token_mask=mask.reshape(-1)
    )
    close32(ours, ref)
    (g_ours,) = grads(ours, [layer.router.weight])
    (g_ref,) = grads(ref, [W])
    close32(g_ours, g_ref)


# ======================================================================================
# MultiLoRA — no official code: the paper's equation
# ======================================================================================


def test_multilora_matches_paper_sum_of_scaled_loras():
    E, r = 3, 2
    layer, method, config = build("multilora", "MultiLoRA", num_experts=E, expert_rank=r, alpha=8.0)
    assert method.scaling(config) == 8.0 / r
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    xr, s = leaf(x), leaf(layer.scales)
    As = [leaf(layer.lora_A[e * r : (e + 1) * r]) for e in range(E)]
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(E)]
    ref = layer.base_layer(xr) + multilora_ref.multilora_delta(xr, As, Bs, s, alpha=8.0, r=r)
    close(out, ref)
    gx, gA, gB, gs = grads(out, [xo, layer.lora_A, layer.lora_B, layer.scales])
    rx, rs, *rest = grads(ref, [xr, s, *As, *Bs])
    close(gx, rx)
    close(gs, rs)
    close(gA.view(E, r, -1), torch.stack(rest[:E]))
    close(as_B_blocks(gB, E, r), torch.stack(rest[E:]))


# ======================================================================================
# MALoRA — no official code: the paper's equation
# ======================================================================================


def malora_reference(layer, x, **kw):
    E, r = layer.num_experts, layer.expert_rank
    xr, W, S = leaf(x.reshape(-1, D_IN)), leaf(layer.router.weight), leaf(layer.shared_S)
    Ps = [leaf(layer.shared_P[e * r : (e + 1) * r]) for e in range(E)]
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(E)]
    delta = malora_ref.malora_delta(
        xr, S, Ps, Bs, W, top_k=layer.top_k, alpha=layer.config.alpha, r_e=r, **kw
    )
    out = (layer.base_layer(xr) + delta).view(*x.shape[:-1], -1)
    return out, [xr, W, S, *Ps, *Bs]


def check_malora(layer, x, ref, leaves, out, xo):
    E, r = layer.num_experts, layer.expert_rank
    params = [xo, layer.router.weight, layer.shared_S, layer.shared_P, layer.lora_B]
    gx, gW, gS, gP, gB = grads(out, params)
    rx, rW, rS, *rest = grads(ref, leaves)
    close(gx.reshape(-1, D_IN), rx)
    close(gW, rW)
    close(gS, rS)
    close(gP.view(E, r, -1), torch.stack(rest[:E]))
    close(as_B_blocks(gB, E, r), torch.stack(rest[E:]))


@pytest.mark.parametrize("path", PATHS)
def test_malora_matches_paper_shared_subspace(path):
    layer, method, config = build(
        "malora", "MALoRA", num_experts=4, expert_rank=2, shared_rank=3, top_k=2, path=path
    )
    assert method.scaling(config) == config.alpha / 2  # alpha / r_e
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    ref, leaves = malora_reference(layer, x)
    close(out, ref)
    check_malora(layer, x, ref, leaves, out, xo)


def test_malora_differs_top1_gate():
    """Same top-1 rule as SiRA/MoLoRA: the full-softmax probability of the chosen expert
    instead of the constant softmax over one logit."""
    layer, _, _ = build("malora", "MALoRA", num_experts=4, expert_rank=2, shared_rank=3, top_k=1)
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    not_close(out, malora_reference(layer, x)[0])
    ref, leaves = malora_reference(layer, x, switch_top1=True)
    close(out, ref)
    check_malora(layer, x, ref, leaves, out, xo)


# ======================================================================================
# MoA — no official code: the paper's stage two (sequence-level router, task-label loss)
# ======================================================================================


@pytest.mark.parametrize("k", [1, 2])
def test_moa_sequence_router_and_label_loss(k):
    T, r = 4, 2
    layer, _, config = build(
        "moa", "MoA", num_experts=T, expert_rank=r, top_k=k, router_supervision=0.7
    )
    layer.supervision_scale = 0.25  # as if four modules were adapted
    x = tokens()
    prompt = torch.ones(BATCH, SEQ, dtype=torch.bool)
    prompt[0, 3:] = False  # answer tokens: not read by the router
    prompt[2, 4:] = False
    labels = torch.tensor([2, 0, 3])
    layer.prompt_mask = prompt.reshape(-1)
    layer.task_labels = labels
    layer.train()
    xo = leaf(x)
    out = layer(xo)
    aux = layer.aux_loss()
    xr, W = leaf(x), leaf(layer.router.weight)
    As = [leaf(layer.lora_A[e * r : (e + 1) * r]) for e in range(T)]
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(T)]
    ref = layer.base_layer(xr) + moa_ref.moa_sequence_delta(
        xr, As, Bs, W, alpha=config.alpha, r=r, top_k=k, prompt_mask=prompt
    )
    ref_aux = 0.7 * 0.25 * F.cross_entropy(moa_ref.moa_router_logits(xr, W, prompt), labels)
    close(out, ref)
    close32(aux, ref_aux)  # the cross-entropy is taken in float32 by design
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, rW, *rest = grads(ref, [xr, W, *As, *Bs])
    close(gx, rx)
    close(gW, rW)  # k = 1: zero (the router learns from the label loss only)
    close(gA.view(T, r, -1), torch.stack(rest[:T]))
    close(as_B_blocks(gB, T, r), torch.stack(rest[T:]))
    ax, aW = torch.autograd.grad(aux, [xo, layer.router.weight])
    bx, bW = torch.autograd.grad(ref_aux, [xr, W])
    close32(ax, bx)
    close32(aW, bW)


def test_moa_eval_pools_every_token():
    T, r = 4, 2
    layer, _, config = build("moa", "MoA", num_experts=T, expert_rank=r, top_k=1)
    layer.eval()
    x = tokens()
    out = layer(x)
    every = torch.ones(BATCH, SEQ, dtype=torch.bool)
    As = [layer.lora_A[e * r : (e + 1) * r] for e in range(T)]
    Bs = [layer.lora_B[:, e * r : (e + 1) * r] for e in range(T)]
    ref = layer.base_layer(x) + moa_ref.moa_sequence_delta(
        x, As, Bs, layer.router.weight, alpha=config.alpha, r=r, top_k=1, prompt_mask=every
    )
    close(out, ref)


def test_every_oracle_names_its_source():
    for mod in (
        smora_ref,
        molora_ref,
        hydra_ref,
        mixlora_ref,
        sira_ref,
        multilora_ref,
        malora_ref,
        moa_ref,
    ):
        assert mod.SOURCE and mod.__doc__
    assert len(smora_ref.SOURCE["commit"]) == 40 and len(molora_ref.SOURCE["commit"]) == 40
    assert math.isclose(smora_ref.AUTHORS_BIAS_UPDATE_RATE, 1e-5)


# ======================================================================================
# HydraLoRA (built-in) — official code: Clin0212/HydraLoRA, peft/tuners/lora.py
# ======================================================================================


def test_hydralora_method_matches_authors_code():
    """Our built-in HydraLoRA (one shared A, E heads, dense softmax router) against the
    authors' forward: outputs and the gradients of x, A, every head's B and the router."""
    E, r = 4, 2
    layer, method, config = build("hydralora", "HydraLoRA", heads=E, rank=r, alpha=32.0)
    assert method.count(config, method_shape()).total == r * D_IN + E * r * D_OUT + E * D_IN
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    A, W = leaf(layer.lora_A), leaf(layer.router.weight)
    Bs = [leaf(layer.lora_B[e]) for e in range(E)]
    xr = leaf(x)
    ref = hydra_ref.hydralora_forward(
        xr, layer.base_layer.weight, layer.base_layer.bias, A, Bs, W,
        lora_alpha=32.0, r=r, softmax_dtype=DT,
    )  # fmt: skip
    close(out, ref)
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, rA, rW, *rBs = grads(ref, [xr, A, W, *Bs])
    close(gx, rx)
    close(gA, rA)
    close(gB, torch.stack(rBs))
    close(gW, rW)


def method_shape():
    from harness.adapters import TargetShape

    return TargetShape("linear", D_IN, D_OUT)


# ======================================================================================
# LoRAMoE — official code: Ablustrund/LoRAMoE, peft/tuners/lora.py (tests/oracles/loramoe.py)
# ======================================================================================


def loramoe_reference(layer, x, types, **kw):
    E, r = layer.num_experts, layer.expert_rank
    xr, W = leaf(x), leaf(layer.router.weight)
    As = [leaf(layer.lora_A[e * r : (e + 1) * r]) for e in range(E)]
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(E)]
    out, blc = loramoe_ref.loramoe_forward(
        xr, layer.base_layer.weight, layer.base_layer.bias, W, As, Bs,
        lora_alpha=layer.config.alpha, r=r, task_types=types, **kw,
    )  # fmt: skip
    return out, blc, xr, W, As, Bs


@pytest.mark.parametrize("E", [4, 6])
def test_loramoe_matches_authors_code_with_localized_balance(E):
    """Soft routing and the localized balancing constraint (cv² of the type-weighted
    importance) against the authors' forward: outputs, the auxiliary loss, and the
    gradients of the output and of the loss."""
    r = 2
    layer, method, config = build(
        "loramoe", "LoRAMoE", num_experts=E, expert_rank=r, alpha=32.0,
        balance_weight=0.3, balance_alpha=0.2, knowledge_tasks=["kq"],
    )  # fmt: skip
    types = method.task_label_ids(config, ["kq", "other", "kq"])
    assert types.tolist() == [1, 0, 1]
    layer.train()
    layer.task_labels = types
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    aux = layer.aux_loss()
    ref, blc, xr, W, As, Bs = loramoe_reference(layer, x, types, blc_alpha=0.2, blc_weight=0.3)
    close(out, ref)
    assert float(blc.detach()) > 0
    close32(aux, blc)
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, rW, *rAB = grads(ref, [xr, W, *As, *Bs])
    close32(gx, rx)  # the router's softmax is float32 on both sides
    close(gA.view(E, r, D_IN), torch.stack(rAB[:E]))
    close(as_B_blocks(gB, E, r), torch.stack(rAB[E:]))
    close32(gW, rW)
    ax, aW = torch.autograd.grad(aux, [xo, layer.router.weight])
    bx, bW = torch.autograd.grad(blc, [xr, W])
    close32(ax, bx)
    close32(aW, bW)


def test_loramoe_no_constraint_without_labels_or_in_eval():
    """The constraint needs each sequence's type (training only), as the authors' code
    (``task_types=None`` gives 0); ``balance_weight: 0`` is the released script's setting."""
    layer, method, config = build("loramoe", "LoRAMoE", num_experts=4, expert_rank=2)
    assert (config.balance_weight, config.balance_alpha) == (0.1, 0.1)
    layer.train()
    layer(tokens())
    assert layer.aux_loss() is None
    layer.task_labels = method.task_label_ids(config, ["a", "b", "c"])
    layer.eval()
    layer(tokens())
    assert layer.aux_loss() is None
    off, _, _ = build("loramoe", "LoRAMoE", num_experts=4, expert_rank=2, balance_weight=0.0)
    off.train()
    off.task_labels = torch.tensor([0, 1, 0])
    off(tokens())
    assert off.aux_loss() is None


def test_loramoe_differs_padding_not_in_importance():
    """Difference: the authors' importance sums every position of the padded batch; ours
    only the real tokens. Without the padded positions the two agree."""
    layer, _, _ = build("loramoe", "LoRAMoE", num_experts=4, expert_rank=2, balance_weight=1.0)
    layer.train()
    types = torch.tensor([0, 1, 0])
    layer.task_labels = types
    mask = torch.ones(BATCH, SEQ, dtype=torch.bool)
    mask[1, 3:] = False
    x = tokens()
    layer.token_mask = mask.reshape(-1)
    layer(x)
    ours = layer.aux_loss()
    _, authors, *_ = loramoe_reference(layer, x, types, blc_alpha=0.1, blc_weight=1.0)
    not_close(ours.to(DT), authors.to(DT))
    layer.token_mask = None
    gate = torch.softmax(layer.router(x).float(), dim=-1) * mask.unsqueeze(-1)
    importance = gate.sum(1)
    coef = torch.where((types == 1).unsqueeze(-1) == (torch.arange(4) < 2), 1.1, 0.9)
    close32(ours, loramoe_ref.cv_squared((importance * coef).flatten()))


# ======================================================================================
# MoLA — official code: GCYZSL/MoLA, src/mola_lora_hacked.py (tests/oracles/mola.py)
# ======================================================================================


def mola_reference(layer, x, k):
    E, r = layer.num_experts, layer.expert_rank
    xr, W = leaf(x), leaf(layer.router.weight)
    As = [leaf(layer.lora_A[e * r : (e + 1) * r]) for e in range(E)]
    Bs = [leaf(layer.lora_B[:, e * r : (e + 1) * r]) for e in range(E)]
    out = mola_ref.linear_moe_forward(
        xr, layer.base_layer.weight, layer.base_layer.bias, W, As, Bs,
        top_k=k, lora_alpha=layer.config.alpha, r=r, softmax_dtype=DT,
    )  # fmt: skip
    return out, xr, W, As, Bs


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("E", [2, 6])
def test_mola_layer_matches_authors_code(E, path):
    """One layer of MoLA (top-2 of E experts, renormalised) against the authors'
    ``Linear_MoE.forward``: outputs and every gradient."""
    r, k = 2, 2
    layer, _, _ = build("mola", "MoLA", num_experts=E, expert_rank=r, top_k=k, alpha=16.0, path=path)
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    ref, xr, W, As, Bs = mola_reference(layer, x, k)
    close(out, ref)
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, rW, *rAB = grads(ref, [xr, W, *As, *Bs])
    close(gx, rx)
    close(gA.view(E, r, D_IN), torch.stack(rAB[:E]))
    close(as_B_blocks(gB, E, r), torch.stack(rAB[E:]))
    close(gW, rW)


def test_mola_solves_the_papers_allocation_on_32_layers():
    """At the paper's setting (32 layers, rank-8 experts, 5 a layer on average: R = 40,
    top-2: K = 16, G = 5) the solver gives exactly the authors' per-layer lists
    (``number_experts`` 2x8, 4x8, 6x8, 8x8; ``top_k`` 2), and the total is LoRA rank 40's."""
    from harness.adapters import BudgetRequest, TargetShape, Variant
    from harness.adapters.grid import layer_positions, lora_count

    method = method_module("mola").MoLA()
    shapes = [TargetShape(f"model.layers.{i}.mlp.up_proj", D_IN, D_OUT) for i in range(32)]
    config = method.solve(BudgetRequest(40, 16, (5,)), Variant(5, "G5"), shapes)
    assert config.experts_per_group == [2, 4, 6, 8] and config.expert_rank == 8 and config.top_k == 2
    positions = layer_positions(shapes)
    per_layer = [method.layer_config(config, *positions[s.name]) for s in shapes]
    assert [c.num_experts for c in per_layer] == mola_ref.PAPER_NUMBER_EXPERTS
    assert [c.top_k for c in per_layer] == mola_ref.PAPER_TOP_K
    count = method.count_model(config, shapes)
    assert count.total - count.router == lora_count(40, shapes)
    assert count.router == sum(mola_ref.PAPER_NUMBER_EXPERTS) * D_IN
    assert method.describe(config)["experts_per_layer"] == "2-4-6-8"


# ======================================================================================
# MoDE — no official code: the paper's dyadic sum (tests/oracles/mode.py)
# ======================================================================================


@pytest.mark.parametrize("k", [None, 1, 2])
def test_mode_matches_paper_dyadic_sum(k):
    """Shared A, per-expert up-projections, one router per rank dimension: our stacked
    layer against the paper's sum over every (rank dimension, expert) dyad, outputs and
    the gradients of every a_j, b_{i,j}, router and the input."""
    n, r = 4, 3
    layer, _, _ = build("mode", "MoDE", num_experts=n, expert_rank=r, top_k=k, alpha=8.0)
    x = tokens()
    xo = leaf(x)
    out = layer(xo)
    a_rows = [leaf(layer.lora_A[j]) for j in range(r)]
    b_cols = [[leaf(layer.lora_B[:, i * r + j]) for j in range(r)] for i in range(n)]
    routers = [leaf(layer.router.weight[j * n : (j + 1) * n]) for j in range(r)]
    xr = leaf(x)
    delta = mode_ref.mode_delta(xr.reshape(-1, D_IN), a_rows, b_cols, routers, alpha=8.0, top_k=k)
    ref = layer.base_layer(xr) + delta.view(BATCH, SEQ, D_OUT)
    close(out, ref)
    flat_b = [b for row in b_cols for b in row]
    gx, gA, gB, gW = grads(out, [xo, layer.lora_A, layer.lora_B, layer.router.weight])
    rx, *rest = grads(ref, [xr, *a_rows, *flat_b, *routers])
    close(gx, rx)
    close(gA, torch.stack(rest[:r]))
    close(gB.T, torch.stack(rest[r : r + n * r]))  # column i·r + j is b_{i,j}
    close(gW, torch.cat(rest[r + n * r :]))


def test_new_oracles_name_their_source():
    assert loramoe_ref.SOURCE["commit"] == "117728885a4069b74d3fe0f2d71ca84fa5918df4"
    assert mola_ref.SOURCE["commit"] == "01785c84c70846999638b11b88409fdf86361d9a"
    assert mode_ref.SOURCE["paper"] == "arXiv 2408.01505" and mode_ref.__doc__
