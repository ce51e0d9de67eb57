"""The composers over MoA's stage-one task LoRAs (issue 34, docs/composition.md): X-LoRA and
Arrow held against peft's own implementations, their budgets, and one tiny two-stage study in
process (stage one shared by every composer, Arrow training nothing).

* X-LoRA: a whole tiny Llama against peft's ``XLoraModel`` over the same task LoRAs and
  classifier weights (the scalings bit-identical, the logits to float rounding), dense and
  top-k; the scaling pass under the lower-layer cache equals the full-depth one; none while
  the cache is built; right padding changes no real token; gradient checkpointing gives the
  same losses; a lone layer or a key-value cache is refused with the reason;
* Arrow: the layer against peft's ``ArrowLoraLinearLayer.forward`` on tiny tensors, a whole
  model against ``create_arrow_model`` (the prototypes bit-identical); the plugin checks of
  ``check_layer``; its one training step changes nothing;
* budgets: counts equal the real parameters (meta-device check included), the notes state
  each composer's stage-two parameters and passes, ``python -m harness methods`` lists both.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.adapters import BudgetRequest, TargetShape, Variant, apply_method, get_method
from tests.conftest import TINY_STUDY_MODEL, make_tiny_llama

T, R, ALPHA = 3, 6, 4.0
RANK = R // T
TASKS = ["color", "animal", "tool"]


def all_targets(model, layers=None) -> list[TargetShape]:
    """Every linear layer of the decoder layers (all of them, or those in ``layers``)."""
    return [
        TargetShape(n, m.in_features, m.out_features)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".layers." in n
        and (layers is None or int(n.split(".")[2]) in layers)
    ]


def peft_task_loras(folder: Path, base, targets, seed: int = 0) -> list[Path]:
    """``T`` peft LoRA folders of rank ``RANK`` on ``targets`` with random A and B (peft's
    ``init_lora_weights=False``), as stage one would leave them."""
    from peft import LoraConfig, get_peft_model

    paths = []
    for t in range(T):
        torch.manual_seed(seed + 10 + t)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=[s.name for s in targets], init_lora_weights=False,
        ))
        model.save_pretrained(str(folder / f"task{t}"))
        paths.append(folder / f"task{t}")
    return paths


def fill_blocks(model, targets, paths) -> None:
    """Copy task LoRA ``t`` (a peft folder) into rank block ``t`` of every composer layer."""
    from safetensors.torch import load_file

    states = [load_file(str(p / "adapter_model.safetensors")) for p in paths]
    with torch.no_grad():
        for s in targets:
            layer = model.get_submodule(s.name)
            for t, state in enumerate(states):
                layer.lora_A[t * RANK:(t + 1) * RANK].copy_(state[f"base_model.model.{s.name}.lora_A.weight"])
                layer.lora_B[:, t * RANK:(t + 1) * RANK].copy_(state[f"base_model.model.{s.name}.lora_B.weight"])


def composer(name: str, model, targets, **options):
    method = get_method(name)
    config = method.solve(BudgetRequest(R, RANK, (T,), alpha=ALPHA), Variant(T, f"T{T}"), targets,
                          {"tasks": TASKS[:T], **options})
    handle = apply_method(model, method, config, targets)
    return method, config, handle


# -- X-LoRA against peft ---------------------------------------------------------------------


def peft_xlora(base, paths, **fields):
    from peft import XLoraConfig, get_peft_model

    model = copy.deepcopy(base)
    model.config.use_cache = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
                             adapters={str(t): str(p) for t, p in enumerate(paths)},
                             layerwise_scalings=True, **fields)
        return get_peft_model(model, config)


@pytest.mark.parametrize("options", [{}, {"top_k": 2}, {"top_k": 2, "enable_softmax": False, "enable_softmax_topk": True}],
                         ids=["dense", "top2", "top2-softmax-topk"])
def test_xlora_equals_peft_xlora_model(tmp_path, options):
    base = make_tiny_llama()
    targets = all_targets(base)
    paths = peft_task_loras(tmp_path, base, targets)
    peft_fields = {("top_k_lora" if k == "top_k" else k): v for k, v in options.items()}
    reference = peft_xlora(base, paths, **peft_fields)
    ours = copy.deepcopy(base)
    composer("xlora", ours, targets, **options)
    fill_blocks(ours, targets, paths)
    classifier = reference.base_model.internal_xlora_classifier
    ours.xlora_classifier.load_state_dict(classifier.state_dict())
    ids = torch.randint(0, base.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = ours(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    layer = ours.get_submodule(targets[0].name)
    assert torch.equal(layer.scalings, reference.base_model.get_latest_scalings())
    assert layer.scalings.shape == (2, 7, len(targets), T)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2  # not vacuous: the task LoRAs change the output
    # the classifier is all that trains
    assert {n for n, p in ours.named_parameters() if p.requires_grad} >= {"xlora_classifier.layers.0.weight"}


def test_xlora_scaling_pass_under_the_lower_layer_cache_and_padding():
    from harness.model.lower_cache import full_forward, lower_forward, upper_forward

    model = make_tiny_llama(layers=3)
    targets = all_targets(model, layers={2})
    composer("xlora", model, targets)
    with torch.no_grad():
        for s in targets:
            model.get_submodule(s.name).lora_B.normal_(0, 0.5)
    calls = []
    model.xlora_classifier.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = full_forward(model, ids, mask)
        assert len(calls) == 1
        lower = lower_forward(model, ids, mask, 2)
        assert len(calls) == 1  # the frozen lower layers alone: no scaling pass
        split = upper_forward(model, lower, mask, 2)
        assert len(calls) == 2
        torch.testing.assert_close(split, full, rtol=0, atol=1e-6)
        # right padding: the real tokens' outputs and scalings do not change
        padded_ids = torch.cat([ids, torch.zeros(2, 3, dtype=ids.dtype)], dim=1)
        padded_mask = torch.cat([mask, torch.zeros(2, 3, dtype=mask.dtype)], dim=1)
        padded = full_forward(model, padded_ids, padded_mask)
        torch.testing.assert_close(padded[:, :6], full, rtol=0, atol=1e-5)


def test_xlora_refuses_a_lone_layer_a_kv_cache_and_a_wrong_hidden_size():
    model = make_tiny_llama()
    targets = all_targets(model, layers={1})
    _, config, _ = composer("xlora", model, targets)
    layer = model.get_submodule(targets[0].name)
    with pytest.raises(RuntimeError, match="scaling pass"):
        layer(torch.randn(1, 3, targets[0].d_in))
    ids = torch.randint(0, model.config.vocab_size, (1, 4))
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=True)  # a fresh cache is fine (the pass uses none)
        with pytest.raises(RuntimeError, match="key-value cache"):
            model(input_ids=ids[:, :1], past_key_values=out.past_key_values, use_cache=True)
    other = make_tiny_llama()
    wrong = get_method("xlora").make_config(**{**config.to_dict(), "hidden_size": 48})
    with pytest.raises(Exception, match="hidden_size"):
        apply_method(other, get_method("xlora"), wrong, targets)


def _train_losses(name: str, checkpointing: bool, steps: int = 3) -> list[float]:
    from harness.model.base import autocast_context
    from harness.run.train import make_optimizer, make_scheduler, optimizer_step

    model = make_tiny_llama()
    targets = all_targets(model, layers={1})
    torch.manual_seed(0)
    _, _, handle = composer(name, model, targets)
    with torch.no_grad():
        for s in targets:
            model.get_submodule(s.name).lora_B.normal_(0, 0.3, generator=torch.Generator().manual_seed(3))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    train = {"weight_decay": 0.0, "schedule": "constant"}
    optimizer = make_optimizer(handle, train, 1e-2)
    scheduler = make_scheduler(optimizer, train, steps, 0)
    losses = []
    for step in range(steps):
        g = torch.Generator().manual_seed(step)
        ids = torch.randint(0, model.config.vocab_size, (4, 9), generator=g)
        mask = torch.ones_like(ids)
        mask[2:, 7:] = 0
        batch = (ids, mask, torch.tensor([0, 1, 2, 3]), torch.tensor([8, 8, 6, 6]),
                 torch.randint(0, model.config.vocab_size, (4,), generator=g))
        loss, _, _ = optimizer_step(model, handle, optimizer, scheduler, batch, None,
                                    autocast_context(torch.device("cpu"), "float32"), None, 1.0, RuntimeError)
        losses.append(float(loss.detach()))
    return losses


def test_xlora_gradient_checkpointing_gives_the_same_losses():
    plain = _train_losses("xlora", False)
    assert plain[0] != plain[-1]  # the head (and here the blocks) train
    assert _train_losses("xlora", True) == plain


def test_xlora_route_makes_no_host_sync():
    from harness.adapters.testing import NoHostSync

    model = make_tiny_llama()
    targets = all_targets(model, layers={1})
    composer("xlora", model, targets, top_k=2)
    layer = model.get_submodule(targets[0].name)
    layer.scalings = torch.rand(2, 5, len(targets), T)
    with NoHostSync():
        layer(torch.randn(2, 5, targets[0].d_in)).sum()


# -- Arrow against peft ----------------------------------------------------------------------


def test_arrow_layer_equals_peft_arrow_forward_on_tiny_tensors():
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    torch.manual_seed(0)
    d_in, d_out, experts, rank, k = 12, 10, 4, 3, 2
    holder = nn.Module()
    holder.linear = nn.Linear(d_in, d_out, bias=False)
    method = get_method("arrow_lora")
    config = method.make_config(alpha=6.0, num_experts=experts, expert_rank=rank, top_k=k,
                                router_temperature=0.7, rng_seed=5, tasks=list("abcd"))
    apply_method(holder, method, config, [TargetShape("linear", d_in, d_out)])
    layer = holder.linear
    with torch.no_grad():
        layer.lora_A.normal_()
        layer.lora_B.normal_()
    layer.build_prototypes()

    names = [f"task_{t}" for t in range(experts)]
    arrow_config = ArrowConfig(top_k=k, router_temperature=0.7, rng_seed=5)
    arrow_config.task_adapter_names = names
    reference = ArrowLoraLinearLayer(d_in, arrow_config)
    lora_A = nn.ModuleDict({n: nn.Linear(d_in, rank, bias=False) for n in names})
    lora_B = nn.ModuleDict({n: nn.Linear(rank, d_out, bias=False) for n in names})
    with torch.no_grad():
        for t, n in enumerate(names):
            lora_A[n].weight.copy_(layer.lora_A[t * rank:(t + 1) * rank])
            lora_B[n].weight.copy_(layer.lora_B[:, t * rank:(t + 1) * rank])
    reference.build_prototypes(lora_A, lora_B)
    assert torch.equal(reference.prototypes, layer.prototypes)  # peft's own code made both

    x = torch.randn(3, 5, d_in)
    with torch.no_grad():
        expected = reference(x, lora_A, lora_B, nn.Identity(), {n: 6.0 / rank for n in names})
        got = layer.delta(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    # every token uses k of the 4 LoRAs, not always the same ones
    index = layer.route(x.reshape(-1, d_in), None).index
    assert index.shape == (15, k) and len(set(index[:, 0].tolist())) > 1


def test_arrow_model_equals_create_arrow_model(tmp_path):
    from peft import ArrowConfig, create_arrow_model

    base = make_tiny_llama()
    targets = all_targets(base)  # peft's Arrow needs the task LoRAs on every layer it routes
    paths = peft_task_loras(tmp_path, base, targets, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = create_arrow_model(copy.deepcopy(base), [str(p) for p in paths],
                                       ArrowConfig(top_k=2, router_temperature=1.0, rng_seed=0))
    ours = copy.deepcopy(base)
    composer("arrow_lora", ours, targets, top_k=2)
    fill_blocks(ours, targets, paths)
    for s in targets:
        ours.get_submodule(s.name).build_prototypes()
    ids = torch.randint(0, base.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        got = ours(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    for s in targets:
        peft_layer = reference.base_model.model.get_submodule(s.name)
        assert torch.equal(peft_layer.lora_arrow["arrow_router"].prototypes, ours.get_submodule(s.name).prototypes)


def test_arrow_passes_the_plugin_checks():
    from harness.adapters.testing import check_layer

    method = get_method("arrow_lora")
    config = method.solve(BudgetRequest(4, 2, (4,), alpha=8.0), Variant(4, "T4"),
                          [TargetShape("linear", 16, 12)], {"tasks": list("abcd")})
    assert config.top_k == 2  # K / r: the activated budget of LoRA rank K
    check_layer(method, config)


# -- budgets ---------------------------------------------------------------------------------


def test_budgets_count_what_the_modules_hold_and_say_what_stage_two_costs():
    from harness.plan.budget import solve_study, verify_counts

    model = make_tiny_llama()
    shapes = all_targets(model, layers={1})
    request = BudgetRequest(R, RANK, (T,), alpha=ALPHA)
    rows = solve_study(request, [(get_method(n), {"tasks": TASKS}) for n in ("moa", "xlora", "arrow_lora")], shapes)
    verify_counts(rows, {r.method: get_method(r.method) for r in rows}, shapes)
    by = {r.method: r for r in rows}
    lora_r = sum(R * (s.d_in + s.d_out) for s in shapes)
    hidden = model.config.hidden_size
    assert by["xlora"].counts.router == len(shapes) * (T * hidden + T)
    assert by["arrow_lora"].counts.router == 0
    for row in rows:
        assert row.verified_total == row.counts.total, row.method
        assert row.counts.total - row.counts.router == lora_r, row.method  # the same task LoRAs
    assert by["arrow_lora"].counts.activated == sum(RANK * (s.d_in + s.d_out) for s in shapes)  # top-1
    assert "+1 no-grad forward" in by["xlora"].as_dict()["note"]
    assert "dense" in by["xlora"].as_dict()["note"]
    assert "training-free" in by["arrow_lora"].as_dict()["note"]
    for name in ("xlora", "arrow_lora"):  # the real model holds what the budget says
        m = make_tiny_llama()
        method = get_method(name)
        handle = apply_method(m, method, by[name].config, shapes)
        assert handle.trainable_numel() == by[name].counts.total


def test_per_task_rank_and_top_k_are_refused_with_the_reason():
    from harness.adapters import BudgetError, OptionError

    shapes = [TargetShape("model.layers.0.q", 8, 8)]
    for name in ("xlora", "arrow_lora"):
        method = get_method(name)
        with pytest.raises(BudgetError, match="multiples of 4"):
            method.solve(BudgetRequest(6, 2, (2,)), Variant(4, "T4"), shapes, {"tasks": list("abcd")})
        with pytest.raises(OptionError, match="top_k"):
            method.solve(BudgetRequest(8, 2, (4,)), Variant(4, "T4"), shapes, {"tasks": list("abcd"), "top_k": 5})


def test_methods_command_lists_both_composers(capsys):
    from harness.cli.main import main

    assert main(["methods", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert "2402.07148" in listed["xlora"]["paper"] and "2405.11157" in listed["arrow_lora"]["paper"]
    assert listed["arrow_lora"]["hyperparameters"]["rng_seed"] == 0
    assert listed["xlora"]["hyperparameters"]["scaling_pass_value"] == 0.0


# -- the two stages through the engine -------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Stage one (three task LoRAs) and the X-LoRA and Arrow runs over them, trained and
    scored in process on the tiny study model."""
    from types import SimpleNamespace

    from harness.data.prepare import prepare_data
    from harness.model.run_folder import write_run_spec
    from harness.plan.config import validate_config
    from harness.plan.study import plan_study
    from harness.run.evaluate import evaluate_run
    from harness.run.train import train_run

    folder = tmp_path_factory.mktemp("composition")
    config = validate_config({
        "study": "composition",
        "out_dir": str(folder / "out"),
        "cache_dir": str(folder / ".cache"),
        "model": TINY_STUDY_MODEL,
        "budget": {"total_rank": R, "active_rank": RANK, "granularities": [T], "alpha": 8},
        "methods": ["moa", "xlora", "arrow_lora"],
        "data": {"source": "generated", "tasks": TASKS, "train_per_task": 8, "test_per_task": 4},
        "train": {"seeds": [0], "steps": 6, "batch_size": 4, "lr": 0.02, "checkpoint_every": 0},
        "eval": {"include_base": False},
    })
    plan = plan_study(config)
    prepare_data(config["data"], plan.out_dir / "data")
    for part in plan.components:
        write_run_spec(config, part, plan.run_dir(part))
        train_run(config, part, plan.run_dir(part), progress=False)
    summaries, metrics = {}, {}
    for run in plan.trained_runs:
        if run.method == "moa":
            continue  # planned for the shared-components check only
        run_dir = plan.run_dir(run)
        write_run_spec(config, run, run_dir)
        summaries[run.method] = train_run(config, run, run_dir, progress=False)
        metrics[run.method] = evaluate_run(config, run, run_dir, progress=False)
    return SimpleNamespace(config=config, plan=plan, summaries=summaries, metrics=metrics)


def test_every_composer_composes_the_same_stage_one_folders(study):
    plan = study.plan
    assert [c.tasks for c in plan.components] == [[t] for t in TASKS]  # trained once
    runs = {r.method: r for r in plan.trained_runs}
    assert runs["moa"].components == runs["xlora"].components == runs["arrow_lora"].components
    assert runs["xlora"].components == [c.path for c in plan.components]


def test_arrow_trains_nothing_and_xlora_only_its_head(study):
    from safetensors.torch import load_file

    arrow, xlora = study.summaries["arrow_lora"], study.summaries["xlora"]
    assert arrow["params"]["trained_in_this_run"] == 0 and arrow["steps"] == 1
    assert arrow["params"]["router"] == 0
    n_modules = len(study.plan.shapes)
    hidden = TINY_STUDY_MODEL["tiny"]["hidden_size"]
    assert xlora["params"]["trained_in_this_run"] == xlora["params"]["router"] == n_modules * (T * hidden + T)
    assert xlora["steps"] == 2  # ceil(6 / 3)
    run_dir = study.plan.run_dir(next(r for r in study.plan.trained_runs if r.method == "arrow_lora"))
    saved = load_file(str(run_dir / "adapter" / "adapter.safetensors"))
    assert all(k.endswith((".anchor", ".prototypes")) for k in saved)  # nothing else is Arrow's
    assert all(v.numel() == 0 for k, v in saved.items() if k.endswith(".anchor"))
    assert all(v.abs().sum() > 0 for k, v in saved.items() if k.endswith(".prototypes"))
    for name in ("arrow_lora", "xlora"):
        m = study.metrics[name]
        assert 0 <= m["suite_acc"] <= 1
        assert m["experts_per_token"] == pytest.approx(1.0 if name == "arrow_lora" else T)


def test_arrow_rows_per_k_with_top_ks():
    from harness.adapters import OptionError

    method = get_method("arrow_lora")
    request = BudgetRequest(12, 4, (3,))
    options = {"tasks": TASKS, "top_ks": [1, 3]}
    rows = method.variants(request, options)
    assert [v.tag for v in rows] == ["T3k1", "T3k3"]
    shapes = [TargetShape("model.layers.0.q", 8, 8)]
    assert [method.solve(request, v, shapes, options).top_k for v in rows] == [1, 3]
    with pytest.raises(OptionError, match="top_ks"):
        method.variants(request, {"tasks": TASKS, "top_ks": [1, 1]})
