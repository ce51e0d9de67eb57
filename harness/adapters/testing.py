"""Checks a method's layer must pass, in one call a plugin author puts in their own tests.

    from harness.adapters.testing import check_layer

    def test_my_method():
        method = get_method("my_method")
        check_layer(method, method.make_config(...))

Every built-in method passes them (``tests/test_gpu_readiness.py``). Each failure raises
``AssertionError`` naming the check:

* **no-op start**: the adapted layer's output equals the frozen layer's, exactly;
* **counts**: ``method.count`` equals the real trainable ``numel``;
* **padding**: tokens marked as padding change neither the real tokens' outputs nor the
  load statistics (capacity and loads count real tokens only);
* **bf16 autocast**: forward and backward under ``torch.autocast(bfloat16)`` (on the CPU, as
  on a GPU) give finite outputs and gradients, close to float32's;
* **gradient checkpointing**: recomputing the forward inside backward gives the same loss
  and gradients, and the per-step hook runs once per step, not per forward;
* **dtypes**: weights and AdamW state saved from a bf16 copy load back into a float32
  layer (and the reverse) and give the same outputs within bf16's precision;
* **devices**: the forward and backward run on the ``meta`` device, so no tensor of the
  hot path is created on the CPU behind the model's back (it would fail there);
* **no host sync**: no ``.item()``, ``int()``/``bool()`` of a tensor, ``nonzero`` or boolean
  indexing in the training or evaluation forward (each would stop a GPU per layer).
"""

from __future__ import annotations

import io
import traceback

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from harness.adapters.base import Method, MethodConfig
from harness.adapters.grid import TargetShape
from harness.adapters.inject import AdapterHandle, apply_method, trainable_numel

#: ops that copy a value to the host (a device->host synchronisation on a GPU)
SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "item", "is_nonzero")
BOOL_INDEX_OPS = ("index", "index_put", "index_put_", "_index_put_impl_")


def _indices(args) -> list:
    return list(args[1]) if len(args) > 1 and isinstance(args[1], (list, tuple)) else []


def _is_bool(index) -> bool:
    return isinstance(index, torch.Tensor) and index.dtype in (torch.bool, torch.uint8)


class HostSyncError(AssertionError):
    """A forward made a host synchronisation; the message names the op."""


class NoHostSync(TorchDispatchMode):
    """Raise on every op that needs a tensor's value on the host (``.item()``, ``int(t)``,
    ``bool(t)``, ``nonzero``, boolean indexing). On the CPU these cost nothing, on a GPU each
    one stops the device: this finds them without one."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            raise HostSyncError(f"host synchronisation in the forward: aten::{name}{_caller()}")
        if name in BOOL_INDEX_OPS and any(_is_bool(i) for i in _indices(args)):
            # boolean indexing runs nonzero inside the kernel, out of this mode's sight
            raise HostSyncError(f"host synchronisation in the forward: aten::nonzero (boolean index){_caller()}")
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """`` at file:line (code)`` of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and frame.filename != __file__:
            return f" at {frame.filename}:{frame.lineno} ({frame.line})"
    return ""


def _holder(method: Method, config: MethodConfig, d_in: int, d_out: int, seed: int):
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.linear = nn.Linear(d_in, d_out, bias=False)
    handle = apply_method(holder, method, config, [TargetShape("linear", d_in, d_out)])
    return holder, handle


def _perturb(holder: nn.Module, seed: int) -> None:
    """Give zero-initialised parameters (B-like matrices) values, so the checks see the
    adapter's real computation, not a no-op."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in holder.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=generator, dtype=p.dtype))


def _loss(holder: nn.Module, handle: AdapterHandle, x: torch.Tensor, mask=None, labels=None) -> torch.Tensor:
    with handle.token_mask(mask), handle.task_labels(labels):
        out = holder.linear(x)
        aux = handle.aux_loss()
    loss = out.float().pow(2).mean()
    return loss if aux is None else loss + aux


def check_layer(
    method: Method,
    config: MethodConfig,
    d_in: int = 16,
    d_out: int = 12,
    seed: int = 0,
    task_labels: list[str] | None = None,
) -> None:
    """Run every check of the module docstring on ``method``'s layer for ``config``.
    ``task_labels`` (one per sequence of a 2 x 5 batch) for methods that need them."""
    labels = task_labels if method.needs_task_labels else None
    x = torch.randn(2, 5, d_in, generator=torch.Generator().manual_seed(seed + 1))

    # no-op start and counts
    holder, handle = _holder(method, config, d_in, d_out, seed)
    base = holder.linear.base_layer if hasattr(holder.linear, "base_layer") else None
    with torch.no_grad():
        holder.eval()
        out = holder.linear(x)
        frozen = base(x) if base is not None else out
    assert torch.equal(out, frozen), f"{method.name}: not an exact no-op at initialisation"
    count = method.count(config, TargetShape("linear", d_in, d_out)).total
    assert count == trainable_numel(holder), (
        f"{method.name}: count() says {count} trainable parameters, the layer holds {trainable_numel(holder)}"
    )
    _perturb(holder, seed)

    # padding changes nothing for the real tokens
    holder.eval()
    with torch.no_grad(), handle.token_mask(None):
        plain = holder.linear(x[:1])
    padded_x = torch.cat([x[:1], torch.full_like(x[:1], 7.0)], dim=1)  # 5 real + 5 padding tokens
    mask = torch.cat([torch.ones(1, 5), torch.zeros(1, 5)], dim=1)
    with torch.no_grad(), handle.token_mask(mask):
        padded = holder.linear(padded_x)
    torch.testing.assert_close(padded[:, :5], plain, msg=lambda m: f"{method.name}: padding changed real tokens: {m}")

    # bf16 autocast: finite, close to float32
    holder.train()
    torch.manual_seed(seed)
    ref = _loss(holder, handle, x, labels=labels)
    ref.backward()
    ref_grads = [p.grad.clone() for p in handle.trainable_parameters()]
    holder.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = _loss(holder, handle, x, labels=labels)
    low.backward()
    assert torch.isfinite(low), f"{method.name}: non-finite loss under bf16 autocast"
    for p, g in zip(handle.trainable_parameters(), ref_grads):
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{method.name}: bad bf16 gradient"
        torch.testing.assert_close(p.grad.float(), g, rtol=0.1, atol=0.02,
                                   msg=lambda m: f"{method.name}: bf16 gradient far from float32: {m}")
    torch.testing.assert_close(low.float(), ref.float(), rtol=0.05, atol=1e-3)
    holder.zero_grad(set_to_none=True)

    # gradient checkpointing: the same loss and gradients; the step hook once per step
    calls = {"n": 0}
    hooks = list(handle.hook_modules.values())
    originals = [m.after_optimizer_step for m in hooks]

    def counted(original):
        def run():
            calls["n"] += 1
            return original()
        return run

    for m, original in zip(hooks, originals):
        m.after_optimizer_step = counted(original)
    try:
        torch.manual_seed(seed)
        plain_loss = _loss(holder, handle, x, labels=labels)
        plain_loss.backward()
        plain_grads = [p.grad.clone() for p in handle.trainable_parameters()]
        handle.after_optimizer_step()
        holder.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with handle.token_mask(None), handle.task_labels(labels):
            out = checkpoint(holder.linear, x, use_reentrant=False)
            aux = handle.aux_loss()
            ck_loss = out.float().pow(2).mean() + (0 if aux is None else aux)
            ck_loss.backward()  # recomputes the forward with the same masks and labels set
        handle.after_optimizer_step()
    finally:
        for m, original in zip(hooks, originals):
            m.after_optimizer_step = original
    torch.testing.assert_close(ck_loss, plain_loss, rtol=1e-6, atol=1e-7)
    for p, g in zip(handle.trainable_parameters(), plain_grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"{method.name}: checkpointing changed a gradient: {m}")
    assert calls["n"] == 2 * len(hooks), f"{method.name}: per-step hook not called once per step"
    holder.zero_grad(set_to_none=True)

    # dtypes: weights and AdamW state through a bf16 copy and back
    optimizer = torch.optim.AdamW(handle.trainable_parameters(), lr=1e-2)
    _loss(holder, handle, x, labels=labels).backward()
    optimizer.step()
    buffer = io.BytesIO()
    torch.save({"adapter": handle.adapter_state_dict(), "optimizer": optimizer.state_dict()}, buffer)
    # rebuilt from the same seed: the frozen base weights match ``holder``'s, the adapter's are reloaded
    low_copy, low_handle = _holder(method, config, d_in, d_out, seed)
    low_copy.to(torch.bfloat16)
    saved = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in handle.adapter_state_dict().items()}
    low_handle.load_state(saved)
    fresh, fresh_handle = _holder(method, config, d_in, d_out, seed)
    fresh_handle.load_state(low_handle.adapter_state_dict())  # bf16 values into float32 params
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)  # tensors and plain containers only: nothing unpickled runs code
    fresh_optimizer = torch.optim.AdamW(fresh_handle.trainable_parameters(), lr=1e-2)
    fresh_optimizer.load_state_dict(state["optimizer"])
    holder.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.linear(x), holder.linear(x), rtol=0.02, atol=0.02,
                                   msg=lambda m: f"{method.name}: weights changed through bf16: {m}")
    assert all(p.dtype == torch.float32 for p in fresh_handle.trainable_parameters())

    # devices: the whole forward and backward on the meta device
    meta_holder, meta_handle = _holder(method, config, d_in, d_out, seed)
    meta_holder.to("meta")
    meta_holder.train()
    x_meta = x.to("meta")
    try:
        with meta_handle.token_mask(torch.ones(2, 5, dtype=torch.bool, device="meta")):
            meta_holder.linear(x_meta).sum().backward()
    except RuntimeError as exc:
        raise AssertionError(f"{method.name}: the forward mixes devices (a tensor made on the CPU?): {exc}") from exc

    # no host synchronisation in the routed forward (training and evaluation)
    for training in (True, False):
        holder.train(training)
        try:
            with NoHostSync(), handle.token_mask(torch.ones(2, 5, dtype=torch.bool)), handle.task_labels(labels):
                out = holder.linear(x)
                aux = handle.aux_loss()
        except HostSyncError as exc:
            raise HostSyncError(f"{method.name} ({'training' if training else 'evaluation'}): {exc}") from None
        (out.sum() + (0 if aux is None else aux)).backward()
