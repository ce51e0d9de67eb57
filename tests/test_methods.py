"""The methods library: counts, no-op starts, equivalences, routing mechanics, gradients."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from harness.adapters import TargetShape, get_method
from harness.adapters.inject import apply_method, trainable_numel

SHAPES = [(32, 32), (32, 48), (48, 32), (7, 5)]

# method name -> (config values, hand-computed counts for shape (i, o))
CASES = {
    "lora": (
        dict(rank=8),
        lambda i, o: (8 * (i + o), 8 * (i + o), 0),
    ),
    "multilora": (
        dict(num_experts=4, expert_rank=2),
        lambda i, o: (4 * 2 * (i + o) + 4, 4 * 2 * (i + o) + 4, 0),
    ),
    "molora": (
        dict(num_experts=4, expert_rank=2),
        lambda i, o: (4 * 2 * (i + o) + 4 * i, 4 * 2 * (i + o) + 4 * i, 4 * i),
    ),
    "molora-sparse": (
        dict(num_experts=4, expert_rank=2, top_k=2, sparse=True),
        lambda i, o: (4 * 2 * (i + o) + 4 * i, 2 * 2 * (i + o) + 4 * i, 4 * i),
    ),
    "sira": (
        dict(num_experts=4, expert_rank=2, top_k=1),
        lambda i, o: (4 * 2 * (i + o) + 4 * i, 1 * 2 * (i + o) + 4 * i, 4 * i),
    ),
    "smora": (
        dict(num_experts=8, expert_rank=1, top_k=2),
        lambda i, o: (8 * (i + o) + 8 * i, 2 * (i + o) + 8 * i, 8 * i),
    ),
    "malora": (
        dict(num_experts=4, expert_rank=3, shared_rank=5, top_k=2),
        # S: 5 x i; P_e: 3 x 5 each; B_e: o x 3 each; router 4 x i
        lambda i, o: (5 * i + 4 * 3 * 5 + 4 * o * 3 + 4 * i, 5 * i + 2 * (3 * 5 + o * 3) + 4 * i, 4 * i),
    ),
}


def method_and_config(case: str, **overrides):
    name = case.split("-")[0]
    method = get_method(name)
    values, _ = CASES[case]
    return method, method.make_config(**{**values, **overrides})


def single_layer(method, config, d_in: int, d_out: int, seed: int = 0):
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.linear = nn.Linear(d_in, d_out, bias=False)
    handle = apply_method(holder, method, config, [TargetShape("linear", d_in, d_out)])
    return holder, handle


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("shape", SHAPES)
def test_analytic_counts_equal_real_numel_and_hand_computation(case, shape):
    d_in, d_out = shape
    method, config = method_and_config(case)
    holder, _ = single_layer(method, config, d_in, d_out)
    count = method.count(config, TargetShape("linear", d_in, d_out))
    assert count.total == trainable_numel(holder)
    assert (count.total, count.activated, count.router) == CASES[case][1](d_in, d_out)


@pytest.mark.parametrize("case", list(CASES))
def test_model_level_count_and_exact_noop_at_init(case, tiny_llama):
    from harness.model.load import adapted_layer_indices, target_shapes

    method, config = method_and_config(case)
    ids = torch.randint(0, 97, (2, 9))
    before = tiny_llama(ids).logits
    targets = target_shapes(
        tiny_llama,
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        adapted_layer_indices(tiny_llama, "all"),
    )
    handle = apply_method(tiny_llama, method, config, targets)
    assert handle.analytic_count().total == trainable_numel(tiny_llama) > 0
    tiny_llama.train()  # dropout-like parts active: still a no-op
    after = tiny_llama(ids).logits
    assert torch.equal(before, after)


# -- equivalences --------------------------------------------------------------------------


def _randomise(layer, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.1)
        if hasattr(layer, "scales"):
            layer.scales.copy_(torch.randn(layer.scales.shape, generator=g))
        if hasattr(layer, "router"):
            layer.router.weight.copy_(torch.randn(layer.router.weight.shape, generator=g))


@pytest.mark.parametrize("name", ["molora", "sira"])
def test_one_expert_mixture_equals_peft_lora(name):
    torch.manual_seed(0)
    d_in, d_out, rank, alpha = 24, 40, 6, 12.0
    mixture = get_method(name)
    extra = {"expert_dropout": 0.0} if name == "sira" else {}
    cfg = mixture.make_config(alpha=alpha, num_experts=1, expert_rank=rank, top_k=1, **extra)
    if name == "molora":
        cfg.top_k = None  # soft: softmax over one expert is 1
    holder, _ = single_layer(mixture, cfg, d_in, d_out)
    layer = holder.linear
    _randomise(layer)
    lora = get_method("lora")
    ref_holder = nn.Module()
    ref_holder.linear = layer.base_layer
    apply_method(ref_holder, lora, lora.make_config(alpha=alpha, rank=rank), [TargetShape("linear", d_in, d_out)])
    peft_layer = ref_holder.linear
    with torch.no_grad():
        peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
        peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
    x = torch.randn(3, 5, d_in)
    layer.eval()
    torch.testing.assert_close(layer(x), peft_layer(x), rtol=0, atol=1e-6)


def reference_delta(name: str, layer, x: torch.Tensor) -> torch.Tensor:
    """Expert by expert, straight from each paper's formula (a Python loop on purpose)."""
    xf = x.reshape(-1, layer.in_features)
    E, r, k = layer.num_experts, layer.expert_rank, layer.top_k
    if name == "malora":
        a_blocks = [layer.shared_P[e * r : (e + 1) * r] @ layer.shared_S for e in range(E)]
    else:
        a_blocks = [layer.lora_A[e * r : (e + 1) * r] for e in range(E)]
    b_blocks = [layer.lora_B[:, e * r : (e + 1) * r] for e in range(E)]
    if name == "multilora":
        gates = layer.scales.expand(xf.shape[0], E)
        scale = layer.config.alpha / r
    else:
        logits = xf @ layer.router.weight.T
        if name == "molora" and k is None:
            gates = torch.softmax(logits, -1)
        elif name == "smora":
            s = torch.sigmoid(logits)
            idx = (s + layer.selection_bias).topk(k, -1).indices
            sel = s.gather(1, idx)
            w = k * sel / sel.sum(-1, keepdim=True) if k > 1 else sel
            gates = torch.zeros_like(s).scatter(1, idx, w)
        elif k == 1:  # top-1: the chosen expert's probability under the full softmax
            probs = torch.softmax(logits, -1)
            idx = probs.argmax(-1, keepdim=True)
            gates = torch.zeros_like(logits).scatter(1, idx, probs.gather(1, idx))
        else:
            vals, idx = logits.topk(k, -1)
            gates = torch.zeros_like(logits).scatter(1, idx, torch.softmax(vals, -1))
        scale = layer.config.alpha / (k * r) if name == "smora" else layer.config.alpha / r
    out = torch.zeros(xf.shape[0], layer.out_features)
    for e in range(E):
        out += gates[:, e : e + 1] * (xf @ a_blocks[e].T @ b_blocks[e].T)
    return (out * scale).reshape(*x.shape[:-1], layer.out_features)


BLOCK_CASES = ["multilora", "molora", "molora-sparse", "sira", "smora", "malora"]


@pytest.mark.parametrize("case", BLOCK_CASES)
@pytest.mark.parametrize("path", ["dense", "sparse"])
def test_block_gated_form_equals_expert_by_expert_reference(case, path):
    name = case.split("-")[0]
    method, config = method_and_config(case, path=path) if path == "dense" or _sparse_ok(case) else (None, None)
    if method is None:
        pytest.skip("dense routing has no sparse path")
    holder, _ = single_layer(method, config, 20, 12)
    layer = holder.linear
    _randomise(layer)
    if name == "smora":
        layer.selection_bias.copy_(torch.linspace(-0.3, 0.3, layer.num_experts))
    layer.eval()
    x = torch.randn(2, 7, 20)
    expected = reference_delta(name, layer, x)
    torch.testing.assert_close(layer.delta(x), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + expected, rtol=1e-5, atol=1e-6)


def _sparse_ok(case: str) -> bool:
    return case not in ("multilora", "molora")


@pytest.mark.parametrize("case", ["molora-sparse", "sira", "smora", "malora"])
def test_sparse_and_dense_paths_agree_in_value_and_gradient(case):
    results = []
    for path in ("dense", "sparse"):
        method, config = method_and_config(case, path=path)
        holder, _ = single_layer(method, config, 16, 24, seed=3)
        layer = holder.linear
        _randomise(layer)
        layer.eval()
        x = torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(5))
        out = layer(x)
        out.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    for n in results[0][1]:
        torch.testing.assert_close(results[0][1][n], results[1][1][n], rtol=1e-4, atol=1e-5)


def test_smora_all_ranks_active_with_uniform_gates_is_lora_of_rank_R():
    R, alpha = 8, 16.0
    smora = get_method("smora")
    holder, _ = single_layer(smora, smora.make_config(alpha=alpha, num_experts=R, expert_rank=1, top_k=R), 12, 10)
    layer = holder.linear
    _randomise(layer)
    with torch.no_grad():
        layer.router.weight.zero_()  # every score 0.5 -> every normalised gate 1
    x = torch.randn(5, 12)
    lora_delta = (alpha / R) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer.delta(x), lora_delta, rtol=1e-6, atol=1e-6)


# -- routing mechanics ------------------------------------------------------------------------


def _forced_router(layer, winner: int = 0):
    """All-positive inputs and a router that scores ``winner`` highest for every token."""
    with torch.no_grad():
        layer.router.weight.fill_(-1.0)
        layer.router.weight[winner].fill_(1.0)


def test_top_k_keeps_exactly_k_experts_per_token():
    method, config = method_and_config("molora-sparse")
    holder, _ = single_layer(method, config, 10, 6)
    layer = holder.linear
    _randomise(layer)
    x = torch.randn(30, 10)
    routing = layer.route(x, None)
    gate = routing.dense_gate(layer.num_experts)
    assert ((gate > 0).sum(-1) == 2).all()
    logits = layer.router(x)
    assert torch.equal(gate > 0, torch.zeros_like(gate, dtype=torch.bool).scatter(1, logits.topk(2).indices, True))
    torch.testing.assert_close(gate.sum(-1), torch.ones(30))


def test_sira_capacity_tokens_past_capacity_skip_the_expert():
    sira = get_method("sira")
    cfg = sira.make_config(num_experts=4, expert_rank=2, top_k=1, capacity_factor=1.0, expert_dropout=0.0, aux_loss_weight=0.0)
    holder, _ = single_layer(sira, cfg, 8, 5)
    layer = holder.linear
    _randomise(layer)
    _forced_router(layer, winner=0)
    x = torch.rand(8, 8) + 0.1  # everyone prefers expert 0; capacity ceil(1*1*8/4) = 2
    layer.train()
    delta = layer.delta(x)
    assert delta[:2].abs().sum() > 0
    assert torch.equal(delta[2:], torch.zeros(6, 5))
    assert layer.expert_load().tolist() == [1.0, 0.0, 0.0, 0.0]  # shares of kept assignments
    # padding consumes no capacity: mask the first token, tokens 1 and 2 get the expert
    layer.token_mask = torch.tensor([False] + [True] * 7)
    delta = layer.delta(x)
    assert delta[1:3].abs().sum(-1).gt(0).all()
    assert torch.equal(delta[3:], torch.zeros(5, 5))
    layer.token_mask = None
    # evaluation applies no capacity by default (outputs independent of the batch)
    layer.eval()
    assert layer.delta(x).abs().sum(-1).gt(0).all()


def test_sira_expert_dropout_only_in_training_and_on_the_gate():
    sira = get_method("sira")
    cfg = sira.make_config(num_experts=4, expert_rank=2, top_k=1, capacity_factor=100.0, expert_dropout=0.5, aux_loss_weight=0.0)
    holder, _ = single_layer(sira, cfg, 8, 5)
    layer = holder.linear
    _randomise(layer)
    x = torch.randn(64, 8)
    layer.eval()
    clean = layer.delta(x)
    assert torch.equal(clean, layer.delta(x))
    layer.train()
    torch.manual_seed(0)
    dropped = layer.delta(x)
    # each token's single gate is either dropped (0) or kept and rescaled by 1/(1-p) = 2
    zero = dropped.abs().sum(-1) == 0
    torch.testing.assert_close(dropped[~zero], 2 * clean[~zero])
    assert 10 < int(zero.sum()) < 54


def test_sira_aux_loss_reaches_the_handle_and_is_one_when_balanced():
    sira = get_method("sira")
    cfg = sira.make_config(num_experts=4, expert_rank=1, top_k=1, aux_loss_weight=1.0, expert_dropout=0.0)
    holder, handle = single_layer(sira, cfg, 6, 6)
    layer = holder.linear
    with torch.no_grad():
        layer.router.weight.zero_()  # uniform probabilities
    layer.train()
    layer(torch.randn(16, 6))
    aux = handle.aux_loss()
    # uniform P_e = 1/4 and f sums to 1, so E * sum f_e P_e = 1 exactly
    torch.testing.assert_close(aux, torch.tensor(1.0))
    assert handle.aux_loss() is None  # consumed once per forward


def test_smora_bias_update_direction_and_no_gradient():
    smora = get_method("smora")
    cfg = smora.make_config(num_experts=4, expert_rank=1, top_k=1, bias_update_rate=0.01)
    holder, handle = single_layer(smora, cfg, 8, 5)
    layer = holder.linear
    _randomise(layer)
    _forced_router(layer, winner=2)
    assert "selection_bias" not in dict(layer.named_parameters())
    layer.train()
    out = layer(torch.rand(10, 8) + 0.1)
    out.sum().backward()
    assert layer.selection_bias.grad is None and not layer.selection_bias.requires_grad
    handle.after_optimizer_step()
    # expert 2 took every token (over mean load): bias down; the others (under): bias up
    assert layer.selection_bias.tolist() == pytest.approx([0.01, 0.01, -0.01, 0.01])
    handle.after_optimizer_step()  # no new forward: no second update
    assert layer.selection_bias.tolist() == pytest.approx([0.01, 0.01, -0.01, 0.01])
    assert "linear.selection_bias" in handle.adapter_state_dict()


ROUTED = ["molora", "molora-sparse", "sira", "smora", "malora"]


@pytest.mark.parametrize("case", [*ROUTED, "smora-k1"])
def test_every_router_gets_a_nonzero_gradient(case):
    if case == "smora-k1":
        method = get_method("smora")
        config = method.make_config(num_experts=8, expert_rank=1, top_k=1)
    else:
        method, config = method_and_config(case)
    holder, _ = single_layer(method, config, 12, 9)
    layer = holder.linear
    with torch.no_grad():  # as after a first optimizer step: B no longer zero
        layer.lora_B.normal_(0, 0.1)
    layer.train()
    layer(torch.randn(3, 7, 12)).pow(2).sum().backward()
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0


def test_multilora_scales_learn_from_the_first_step():
    method, config = method_and_config("multilora")
    holder, _ = single_layer(method, config, 12, 9)
    layer = holder.linear
    layer(torch.randn(5, 12)).pow(2).sum().backward()
    # s = 0 makes step 0 a no-op, yet the scales get a gradient at once (B A x != 0) ...
    assert layer.scales.grad.abs().sum() > 0
    # ... while A and B start learning once the scales have moved
    assert layer.lora_A.grad.abs().sum() == 0


def test_expert_load_is_a_distribution_over_experts():
    for case in ROUTED:
        method, config = method_and_config(case)
        holder, handle = single_layer(method, config, 10, 6)
        _randomise(holder.linear)
        holder.linear(torch.randn(40, 10))
        load = handle.expert_load()["linear"]
        assert len(load) == config.num_experts
        assert math.isclose(sum(load), 1.0, abs_tol=1e-5)


def test_smora_bias_rate_keeps_the_papers_drift_per_run_and_the_paper_form_is_selectable():
    from harness.adapters import PlanContext
    from methods.smora import PAPER_RATE, PAPER_STEPS, scaled_rate

    smora = get_method("smora")
    # exactly the paper's 1e-5 at the paper setting (and when the steps are known only later)
    assert scaled_rate(PAPER_STEPS) == PAPER_RATE == 1e-5
    assert smora.prepare_options({}, PlanContext(tasks=None, steps=None))["bias_update_rate"] == 1e-5
    # the same total drift (rate x steps) at any run length
    for steps in (120, 160, 1000):
        rate = smora.prepare_options({}, PlanContext(tasks=None, steps=steps))["bias_update_rate"]
        assert rate * steps == pytest.approx(PAPER_RATE * PAPER_STEPS)
    # the paper's form, or any rate, when asked for
    assert smora.prepare_options({"bias_update_rate": 1e-5}, PlanContext(None, 160))["bias_update_rate"] == 1e-5


def test_smora_bias_rate_reaches_the_run_config_through_the_plan(tmp_path):
    from harness.plan.config import validate_config
    from harness.plan.study import plan_study
    from tests.conftest import TINY_STUDY_MODEL

    config = validate_config({
        "study": "s", "out_dir": str(tmp_path), "model": TINY_STUDY_MODEL,
        "data": {"source": "generated", "train_per_task": 8, "test_per_task": 4},
        "budget": {"total_rank": 4, "active_rank": 2, "granularities": [4]},
        "methods": ["smora"], "train": {"steps": 100},
    })
    (run,) = plan_study(config).trained_runs
    assert run.method_config["bias_update_rate"] == pytest.approx(1e-5 * 27_669 / 100)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("with_aux", [False, True])
def test_fused_topk_gate_equals_its_composition_in_values_and_gradients(k, with_aux):
    """``topk_gate`` (one autograd node) = top-k softmax, mask, scatter and Switch loss
    composed from ordinary ops: the same gate, loss and logit gradient (float64)."""
    from harness.adapters.routing import (
        TokenBatch,
        assignment_slots,
        load_balancing_loss_from_counts,
        scatter_gate,
        switch_coefficients,
        topk_gate,
        topk_index,
        topk_softmax,
    )

    g = torch.Generator().manual_seed(k)
    n, e = 11, 6
    base = torch.randn(n, e, generator=g, dtype=torch.float64)
    mask = torch.tensor([True] * 8 + [False] * 3)
    gate_mask = (torch.rand(n, k, generator=g) > 0.3).double() * 1.5
    upstream = torch.randn(n, e, generator=g, dtype=torch.float64)
    tokens = TokenBatch(mask)
    index = topk_index(base, k)
    _, counts = assignment_slots(index, e, mask, tokens)

    fused_logits = base.clone().requires_grad_(True)
    coef = switch_coefficients(counts, k, tokens, n, 0.7) if with_aux else None
    gate, aux = topk_gate(fused_logits, index, gate_mask, tokens.weights(n, base.device), coef)
    loss = (gate * upstream).sum() + (aux if with_aux else 0)
    loss.backward()

    plain_logits = base.clone().requires_grad_(True)
    plain_index, weight = topk_softmax(plain_logits, k)
    assert torch.equal(plain_index, index)
    plain_gate = scatter_gate(index, weight * gate_mask, e)
    plain_loss = (plain_gate * upstream).sum()
    if with_aux:
        plain_aux = load_balancing_loss_from_counts(torch.softmax(plain_logits, -1), counts, k, tokens, 0.7)
        torch.testing.assert_close(aux, plain_aux, rtol=1e-12, atol=1e-14)
        plain_loss = plain_loss + plain_aux
    else:
        assert aux is None
    plain_loss.backward()
    torch.testing.assert_close(gate, plain_gate, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fused_logits.grad, plain_logits.grad, rtol=1e-10, atol=1e-12)
    assert fused_logits.grad.abs().sum() > 0
