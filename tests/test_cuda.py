"""Every registered method on CUDA: forward + backward in fp32 and under bf16 autocast, agreement
with the CPU, host synchronisations of the routed forward, and the memory estimate against the
allocator's peak. Skipped without a CUDA device; ``scripts/gpu_check.sh`` runs it on a GPU.

Layers are built the way the harness builds them: a budget solved by each method
(``method.solve`` with a ``BudgetRequest``), inserted by ``apply_method`` into a small module
whose targets are ``nn.Linear`` layers.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from torch import nn

from harness.adapters import BudgetRequest, TargetShape, all_methods, apply_method

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")


D, HIDDEN = 32, 48
TARGETS = [("q", D, D), ("up", D, HIDDEN), ("down", HIDDEN, D)]
TASKS = ["t0", "t1", "t2", "t3"]
REQUEST = dict(total_rank=8, active_rank=2, granularities=(4, 8), router="separate", tolerance=0.05, alpha=16.0)


class Holder(nn.Module):
    """``down(relu(up(q(x))))`` with frozen ``nn.Linear`` targets."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(D, D)
        self.up = nn.Linear(D, HIDDEN)
        self.down = nn.Linear(HIDDEN, D)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.q(x))))


def _options(method) -> dict:
    return {"tasks": TASKS} if getattr(method, "needs_task_labels", False) else {}


def cases() -> list[tuple[str, str, dict, int]]:
    """``(id, method, options, granularity)`` for every registered method at every variant."""
    out = []
    request = BudgetRequest(**REQUEST)
    for name, method in all_methods().items():
        options = _options(method)
        variants = method.variants(request, options)
        for variant in variants:
            out.append((f"{name}-{variant.tag}", name, options, variant))
        if name == "molora":  # the sparse (top-k) form as well
            for variant in variants:
                out.append((f"molora-sparse-{variant.tag}", name, {"sparse": True}, variant))
    return out


CASES = cases()


def build(name: str, options: dict, variant, seed: int = 0):
    """The holder with the method's adapter (solved for the small budget), adapters
    randomised so that the delta is not zero (B-like matrices start at zero)."""
    method = all_methods()[name]
    shapes = [TargetShape(*t) for t in TARGETS]
    config = method.solve(BudgetRequest(**REQUEST), variant, shapes, options)
    torch.manual_seed(seed)
    holder = Holder()
    handle = apply_method(holder, method, config, shapes)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in handle.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    for module in holder.modules():  # SMoRA's selection bias and the like
        for buf in module.buffers(recurse=False):
            if buf.is_floating_point():
                buf.copy_(torch.linspace(-0.1, 0.1, buf.numel()).view_as(buf))
    return holder, handle


def inputs(device, dtype=torch.float32):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 6, D, generator=g)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False  # padding at the end of the second sequence
    return x.to(device=device, dtype=dtype), mask.to(device)


def forward_backward(holder, handle, x, mask, autocast: bool):
    labels = TASKS[: x.shape[0]] if handle.method.needs_task_labels else None
    context = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else torch.autocast("cuda", enabled=False)
    with handle.task_labels(labels), handle.token_mask(mask):
        with context:
            y = holder(x)
        loss = y.float().pow(2).mean()
        aux = handle.aux_loss()
        if aux is not None:
            loss = loss + aux
        loss.backward()
    return y


def grads(handle) -> dict[str, torch.Tensor]:
    named = {id(p): n for n, p in handle.model.named_parameters()}
    return {named[id(p)]: p.grad for p in handle.trainable_parameters()}


def check_finite_on_cuda(y, handle):
    assert y.is_cuda and torch.isfinite(y).all(), "output not on CUDA or not finite"
    got = grads(handle)
    assert got, "no trainable parameters"
    assert any(g is not None for g in got.values()), "no gradient reached the adapter"
    for n, g in got.items():
        if g is None:
            continue
        assert g.is_cuda, f"{n}: gradient on {g.device}"
        assert torch.isfinite(g).all(), f"{n}: non-finite gradient"


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_forward_backward_fp32_on_cuda_matches_cpu(case):
    _, name, options, variant = case
    cpu_holder, cpu_handle = build(name, options, variant)
    gpu_holder, gpu_handle = build(name, options, variant)
    gpu_holder.cuda()
    for p in gpu_handle.trainable_parameters():
        assert p.is_cuda
    # eval mode: no expert dropout, no capacity, so both devices compute the same function
    cpu_holder.eval()
    gpu_holder.eval()
    x, mask = inputs("cpu")
    y_cpu = forward_backward(cpu_holder, cpu_handle, x, mask, autocast=False)
    xg, maskg = inputs("cuda")
    y_gpu = forward_backward(gpu_holder, gpu_handle, xg, maskg, autocast=False)
    check_finite_on_cuda(y_gpu, gpu_handle)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu, rtol=1e-4, atol=1e-5)
    cpu_grads, gpu_grads = grads(cpu_handle), grads(gpu_handle)
    for n, g in cpu_grads.items():
        if g is None:
            assert gpu_grads[n] is None, n
            continue
        torch.testing.assert_close(gpu_grads[n].cpu(), g, rtol=1e-3, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_training_step_fp32_and_bf16_autocast_on_cuda(case):
    _, name, options, variant = case
    for autocast in (False, True):
        holder, handle = build(name, options, variant)
        holder.cuda()
        if autocast:  # as training on CUDA: frozen base weights in bf16, adapters in fp32
            for p in holder.parameters():
                if not p.requires_grad:
                    p.data = p.data.to(torch.bfloat16)
        holder.train()
        x, mask = inputs("cuda", torch.bfloat16 if autocast else torch.float32)
        y = forward_backward(holder, handle, x, mask, autocast=autocast)
        check_finite_on_cuda(y, handle)
        for p in handle.trainable_parameters():
            assert p.dtype == torch.float32, "adapter parameters must stay fp32"
        # the optimizer step and the method's per-step hook run on the device too
        optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-3)
        optimizer.step()
        handle.after_optimizer_step()
        for p in handle.trainable_parameters():
            assert p.is_cuda and torch.isfinite(p).all()


def test_bf16_autocast_output_close_to_fp32():
    """Per token, so that a top-k choice flipped by bf16 rounding of a near-tie (a different
    expert, a different output for that token) does not hide the agreement elsewhere."""
    for case in CASES:
        _, name, options, variant = case
        holder, handle = build(name, options, variant)
        holder.cuda().eval()
        x, mask = inputs("cuda")
        with torch.no_grad(), handle.token_mask(mask):
            y32 = holder(x)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                y16 = holder(x).float()
        assert torch.isfinite(y16).all(), case[0]
        rel = ((y16 - y32).norm(dim=-1) / y32.norm(dim=-1).clamp_min(1e-6)).flatten()
        assert rel.median() < 0.02 and (rel < 0.05).float().mean() >= 0.75, (
            f"{case[0]}: bf16 autocast differs from fp32 by a median {rel.median():.3f} per token")


BF16_BASE_CASES = [
    pytest.param(c, id=c[0], marks=pytest.mark.xfail(
        strict=False, reason="peft's inject_adapter_in_model gives LoRA the base layer's dtype "
        "(bf16); PeftModel would upcast (autocast_adapter_dtype), inject_adapter_in_model does not"))
    if c[1] == "lora" else pytest.param(c, id=c[0])
    for c in CASES
]


@pytest.mark.parametrize("case", BF16_BASE_CASES)
def test_adapters_stay_fp32_on_a_bf16_base_model(case):
    """As harness.run.train builds a run on CUDA: the base model is loaded in bf16 first, then the
    method is applied; the adapters (and so AdamW's state) must be fp32, as docs/cluster.md
    says, for every method alike."""
    _, name, options, variant = case
    method = all_methods()[name]
    shapes = [TargetShape(*t) for t in TARGETS]
    config = method.solve(BudgetRequest(**REQUEST), variant, shapes, options)
    holder = Holder().to(device="cuda", dtype=torch.bfloat16)
    handle = apply_method(holder, method, config, shapes)
    holder.cuda()
    dtypes = {n: p.dtype for n, p in holder.named_parameters() if p.requires_grad}
    assert dtypes and all(d == torch.float32 for d in dtypes.values()), dtypes
    assert handle.trainable_numel() > 0


SYNC_CASES = [c for c in CASES if c[1] in ("sira", "smora", "malora")
              or c[0].startswith("molora-sparse")]


@pytest.mark.parametrize("case", SYNC_CASES, ids=[c[0] for c in SYNC_CASES])
def test_routed_forward_has_no_host_sync_in_training(case, record_property):
    """``torch.cuda.set_sync_debug_mode("error")`` around the routed forward in training mode
    (token mask set, as the training loop does): any ``.item()``, ``int(tensor)``, boolean
    mask indexing or ``nonzero`` that waits for the GPU raises, naming the operation."""
    _, name, options, variant = case
    holder, handle = build(name, options, variant)
    holder.cuda().train()
    x, mask = inputs("cuda")
    with handle.token_mask(mask):
        holder(x)  # warm-up: lazy initialisation (cuBLAS handles, kernels) may synchronise
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            holder(x)
        except RuntimeError as exc:
            where = _project_frame(exc)
            record_property("host_sync", f"{where}: {str(exc).splitlines()[0][:200]}")
            pytest.fail(f"{case[0]}: host synchronisation in the routed forward at {where}: {exc}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
    record_property("sync_free", "true")


def _project_frame(exc: BaseException) -> str:
    """``file:line (function)`` of the innermost frame of this project's code in the traceback."""
    import traceback

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename.startswith(root) and "/tests/" not in f.filename]
    if not frames:
        return "?"
    f = frames[-1]
    return f"{os.path.relpath(f.filename, root)}:{f.lineno} ({f.name}: {(f.line or '').strip()[:80]})"


# -- the memory estimate against the caching allocator's peak ---------------------------------


def _llama(hidden=1024, layers=4, intermediate=2816, heads=8, vocab=8000):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    return model, config


def _targets(model):
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    return [TargetShape(n, m.in_features, m.out_features) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rpartition(".")[2] in names]


MEMORY_CASES = [("lora-r16", "lora", {}, 16, False), ("sira-G8", "sira", {}, 8, False),
                ("lora-r16-checkpointing", "lora", {}, 16, True)]


@pytest.mark.parametrize("case", MEMORY_CASES, ids=[c[0] for c in MEMORY_CASES])
def test_memory_estimate_against_measured_peak(case):
    """One training step of a 4-layer Llama (bf16 weights, fp32 adapters, bf16 autocast,
    SDPA, logits at one answer position per row, AdamW) as ``harness.run.train`` runs it:
    ``torch.cuda.max_memory_allocated`` against ``harness.plan.memory.estimate_memory``'s
    ``allocated``. Written to ``$GPU_CHECK_OUT/memory_check.json``; asserted only loosely."""
    from harness.plan.memory import estimate_memory, row_shape

    label, name, options, g, checkpointing = case
    gc_collect()
    model, config = _llama()
    targets = _targets(model)
    method = all_methods()[name]
    request = BudgetRequest(total_rank=16, active_rank=2, granularities=(8,), router="separate",
                             tolerance=0.05, alpha=16.0)
    variant = next(v for v in method.variants(request, options)
                   if (v.rank == g if v.rank is not None else v.granularity == g))
    method_config = method.solve(request, variant, targets, options)
    handle = apply_method(model, method, method_config, targets)
    for p in handle.trainable_parameters():  # fp32 adapters, as the estimate assumes (peft's
        p.data = p.data.float()              # LoRA would be bf16 here: see the test above)
    model.cuda()
    if checkpointing:  # as harness.run.train enables it: non-reentrant, per decoder layer
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.train()
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-4)
    B, S = 8, 256
    g_ = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (B, S), generator=g_).cuda()
    lengths = torch.tensor([S - 8 * i for i in range(B)])
    mask = (torch.arange(S).unsqueeze(0) < lengths.unsqueeze(1)).long().cuda()
    rows = torch.arange(B).cuda()
    cols = (lengths - 1).cuda()
    targets_ids = torch.randint(0, config.vocab_size, (B,), generator=g_).cuda()

    def step():
        with handle.token_mask(mask):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                hidden = model.model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
                logits = model.lm_head(hidden[rows, cols])
            loss = torch.nn.functional.cross_entropy(logits.float(), targets_ids)
            aux = handle.aux_loss()
            (loss if aux is None else loss + aux).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        handle.after_optimizer_step()

    step()  # the optimizer's state exists from here on, as in every later step
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() / 2**30

    class Row:
        pass

    row = Row()
    row.method, row.config, row.routed = name, method_config, method.routed
    row.counts = method.count_model(method_config, targets)
    estimate = estimate_memory(
        config.to_dict(), row.counts, batch_size=B, seq_len=S, dtype="bfloat16",
        gradient_checkpointing=checkpointing, n_adapted_modules=len(targets), module_shapes=targets,
        **row_shape(row),
    )
    record = {"case": label, "measured_gib": measured, "estimated_gib": estimate["allocated"],
              "terms_gib": estimate}
    out = os.environ.get("GPU_CHECK_OUT")
    if out:
        os.makedirs(out, exist_ok=True)
        path = os.path.join(out, "memory_check.json")
        with open(path) if os.path.exists(path) else open(os.devnull) as f:
            rows_ = json.loads(f.read() or "[]")
        rows_ = [r for r in rows_ if r["case"] != label] + [record]
        with open(path, "w") as f:
            json.dump(rows_, f, indent=2)
    ratio = measured / estimate["allocated"]
    assert 0.33 < ratio < 3.0, f"{label}: measured {measured:.3f} GiB, estimated {estimate['allocated']:.3f} GiB"


def gc_collect():
    import gc

    gc.collect()
    torch.cuda.empty_cache()


def test_device_is_really_cuda_and_copies_back():
    """A guard against a silent CPU fallback: the tensors are on the GPU and round-trip."""
    x = torch.arange(10, device="cuda", dtype=torch.float32)
    assert x.is_cuda and torch.equal(copy.deepcopy(x).cpu(), torch.arange(10, dtype=torch.float32))
