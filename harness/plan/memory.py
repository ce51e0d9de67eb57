"""Peak GPU memory of one training run, estimated from shapes alone (no GPU, no weights).

So that a user knows which GPU a run needs before submitting it: the base model's
``config.json``, the method's parameter counts (a budget row's ``counts``, a
``ParamCount``: total trainable, activated, router), the batch, the sequence length, the dtype, gradient checkpointing and the optimizer.
Pure functions (the standard library and pandas only; nothing here imports the
training, study or command-line modules): :func:`estimate_memory` for one run,
:func:`memory_table` for the rows of a budget table.

The model is a Llama-style decoder (Llama, Mistral, Qwen2, SmolLM2: RMSNorm, rotary
embeddings, SwiGLU MLP, grouped-query attention) trained the way
:mod:`harness.run.train` trains it: frozen base weights in ``dtype``, adapters in fp32;
with ``dtype`` bfloat16/float16 every step runs under bf16 autocast, with float32
there is no autocast; AdamW; logits only at the answer positions.

Symbols
-------

``h`` hidden size, ``L`` decoder layers, ``a`` attention heads, ``a_kv`` key/value
heads, ``d = h / a`` head dim (or ``head_dim``), ``q = a·d``, ``kv = a_kv·d``, ``I``
MLP intermediate size, ``V`` vocabulary; ``B`` batch size, ``S`` sequence length
(padded: the harness pads each batch to its longest item, at most
``train.max_length``, so ``S = max_length`` is the worst case), ``N = B·S`` tokens;
``T`` trainable adapter parameters (``counts.total``); ``M`` adapted linear modules
(``n_adapted_modules``), ``d_in(m)``, ``d_out(m)`` their shapes; ``W = E·r`` the rank
width of one module's adapter (``rank_width``: all experts' stacked ranks; LoRA: its
rank), ``E`` experts, ``k`` top-k, ``r_s`` MALoRA's shared rank; ``c`` bytes of the
compute dtype (2 under bf16 autocast, 4 in float32), ``w`` bytes of the base weights'
dtype, ``f = 4`` (fp32); ``L_g = L - first_adapted_layer`` layers that need a backward
pass (the frozen layers below the first adapted one save nothing).

Terms (bytes; :func:`estimate_memory` returns each in GiB)
------------------------------------------------------------

``base_weights``
    ``w · P_base`` with ``P_base = V·h·(1 if tied else 2) + L·(h·q + 2·h·kv + q·h + 3·h·I
    + 2·h) + h`` (+ ``q + 2·kv`` per layer with attention biases, Qwen2). Llama-2-7B:
    6,738,415,616 parameters, 12.55 GiB in bf16.
``adapter_params``
    ``4 · T``: the trainable parameters are fp32 (the master copy; the base stays in ``w``).
``gradients``
    ``4 · T`` (fp32, one per trainable parameter; ``zero_grad(set_to_none=True)`` frees
    them after each step, so they do not coexist with the activations of the next
    forward: counting both is conservative by at most this term).
``optimizer_states``
    AdamW: ``8 · T`` (``exp_avg`` and ``exp_avg_sq``, fp32; the step counters are
    scalars); SGD without momentum: 0.
``autocast_weight_copies``
    ``2 · T`` under bf16 autocast: the bf16 copy autocast makes of each fp32 adapter
    weight for its matmuls (cached for the step and saved for backward); 0 without
    autocast.
``activations``
    what autograd keeps from the forward for the backward:

    * without gradient checkpointing: ``N · L_g · (A_layer + A_adapters) + P · V · f``
      (the final RMSNorm's saved input and the first adapted layer's first RMSNorm, which
      saves nothing because its input needs no gradient, cancel);
    * with gradient checkpointing (each decoder layer's forward recomputed in backward):
      ``N · (L_g · h · c + A_layer + A_adapters + (h + 1) · f) + P · V · f``: every
      layer's input, one layer recomputed at a time, the final RMSNorm;

    ``P · V · f``: the log-probabilities at the ``P`` answer positions (default one per
    sequence, ``P = B``). Every part is proportional to ``B``: doubling the batch doubles
    this term exactly.

    ``A_layer`` (one frozen decoder layer, per token)::

        2 · (h + 1) · f             two RMSNorms: their fp32 input and 1/rms
        + (2·q + 2·q) · c + a · f   SDPA (memory-efficient / flash kernels): q and k after
                                    RoPE, v (k and v repeated to a heads), the output and
                                    the log-sum-exp
          or (q + 2·q) · c + a·S·(f + c)   eager attention: q, k, v and the S x S
                                    probabilities (the fp32 softmax and its cast; one copy
                                    when c = f)
        + 3 · I · c                 SwiGLU: the gate projection (SiLU's input), SiLU's
                                    output and the up projection

    ``A_adapters`` (the adapted modules of one layer, per token):

    * inputs: under autocast every matmul with an fp32 weight saves its own bf16 copy of
      its input: ``sum_m n_calls(m) · d_in(m) · c`` with ``n_calls`` = 1 (LoRA's or the
      experts' stacked A and the router as one matmul, MALoRA's S and the router). Without autocast the modules
      that read the same tensor share it: ``(2·h + q + I) · f`` for all seven
      projections (q/k/v read the first norm's output, o the attention output,
      gate/up the second norm's output, down the SwiGLU product); fewer when fewer
      projections are adapted, and ``q`` less with SDPA, whose saved output o reads;
    * ranks: ``sum_m (W · c)`` for a plain LoRA (``B`` saves ``A x``); ``2 · W · c`` for a
      gated mixture (``A x`` kept by the gate product, the gated ``A x`` by ``B``): the
      intermediate of width ``E·r`` per token per module; MALoRA adds ``r_s · c`` (``S x``);
    * routing (routed methods): top-k routers ``3 · E · c + 2 · 8 · k``: the (N, E)
      router scores, probabilities and dense gate and the top-k indices (int64,
      saved by the gather of the weights and by the scatter into the gate; SiRA's fused
      gate-and-auxiliary-loss node saves about as much); dense (soft) routers
      ``2 · E · c``: the softmax output and the scaled gate;
``fused_weight_copies`` (routed methods, a per-module constant, not per token): the router
    and the first projection run as one matmul of their concatenated weights
    ``d_in · (W + E) · f`` (MALoRA: ``d_in · (r_s + E) · f``), which autograd saves;
    with gradient checkpointing only the recomputed layer's. Under autocast the saved
    copy is the bf16 cast, already in ``autocast_weight_copies``.
``backward_transient``
    ``N · (A_layer + A_adapters)``: while one layer's backward runs, the gradients of its
    activations are about as large as the activations themselves (an approximation).
``cuda_context``
    a fixed ``cuda_context_gib`` (default 0.5 GiB: the CUDA context, cuBLAS/cuDNN
    handles and workspaces), not seen by ``torch.cuda.max_memory_allocated``.

``allocated`` is the sum of every term but ``cuda_context`` (compare it with
``torch.cuda.max_memory_allocated``); ``total`` adds the context. A run fits a GPU when
``total <= 0.95 x`` its memory (5% headroom for the caching allocator's fragmentation).

Checked against the tensors autograd really saves (``tests/test_memory.py``, a tiny
Llama on the CPU, every method: within 3% in fp32, within 6% under CPU bf16 autocast)
and, on a GPU, against ``torch.cuda.max_memory_allocated`` (``tests/test_cuda.py``,
written to ``memory_check.json`` by ``scripts/gpu_check.sh``).

Not modelled: the rotary cos/sin tables (``2 · d · c`` per position, shared by the batch
and all layers: 256 KiB for Llama-2 at S = 512), the sparse execution path (gathered rows of A, chosen only from
``experts / top-k >= 128``; the paper configs run dense), SiRA's capacity bookkeeping
(transient int64 one-hots of ``N·k·E``), the boolean attention mask (``B·S²`` bytes),
MoA's frozen task adapters (counted as trainable: an upper bound), data-loader and
evaluation memory, and allocator rounding.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GIB = 2**30

#: bytes per element of the dtypes a study config can name (``model.dtype``)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

#: the seven linear projections of a Llama-style decoder layer
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

#: GPU memory sizes the tables report on (GiB, nominal) and the usable share of each
GPU_SIZES_GIB = (24, 40, 80)
HEADROOM = 0.95

#: the order of the terms in the result (then ``allocated`` and ``total``)
TERMS = (
    "base_weights",
    "adapter_params",
    "gradients",
    "optimizer_states",
    "autocast_weight_copies",
    "activations",
    "backward_transient",
    "cuda_context",
)


@dataclass(frozen=True)
class ModelDims:
    """The shapes of a Llama-style decoder that the estimate needs (from a ``config.json``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool
    attention_bias: bool = False

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | Any) -> ModelDims:
        """From a ``config.json`` dict (or anything with ``to_dict()``, e.g. a transformers
        config); missing ``num_key_value_heads`` means no grouping, missing
        ``tie_word_embeddings`` means untied (transformers' Llama default)."""
        if not isinstance(config, Mapping):
            config = config.to_dict()
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            dims = cls(
                hidden=hidden,
                layers=int(config["num_hidden_layers"]),
                heads=heads,
                kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                intermediate=int(config["intermediate_size"]),
                vocab=int(config["vocab_size"]),
                tied=bool(config.get("tie_word_embeddings", False)),
                attention_bias=bool(config.get("attention_bias", False))
                or config.get("model_type") == "qwen2",
            )
        except KeyError as exc:
            raise ValueError(
                f"model config has no {exc.args[0]!r}; expected a Llama-style config.json "
                "(hidden_size, num_hidden_layers, num_attention_heads, intermediate_size, vocab_size)"
            ) from None
        return dims

    def base_parameters(self) -> int:
        """``V·h·(1 if tied else 2) + L·(h·q + 2·h·kv + q·h + 3·h·I + 2·h) + h``."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        return self.vocab * h * (1 if self.tied else 2) + self.layers * per_layer + h

    def module_shape(self, name: str) -> tuple[int, int]:
        """``(d_in, d_out)`` of one of the seven projections, by its (leaf) name."""
        h, q, kv, i = self.hidden, self.q_dim, self.kv_dim, self.intermediate
        shapes = {
            "q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
        }
        leaf = name.rpartition(".")[2]
        if leaf not in shapes:
            raise ValueError(f"unknown projection {name!r}; known: {', '.join(shapes)}")
        return shapes[leaf]

    def input_group(self, name: str) -> tuple[str, int]:
        """Which tensor a projection reads (modules reading the same one share it) and its width."""
        leaf = name.rpartition(".")[2]
        if leaf in ("q_proj", "k_proj", "v_proj"):
            return "attn_norm", self.hidden
        if leaf == "o_proj":
            return "attn_out", self.q_dim
        if leaf in ("gate_proj", "up_proj"):
            return "mlp_norm", self.hidden
        if leaf == "down_proj":
            return "mlp_product", self.intermediate
        raise ValueError(f"unknown projection {name!r}")


def _counts(counts: Any) -> tuple[int, int, int]:
    """``(total, activated, router)`` from a ParamCount, a mapping or a 3-tuple."""
    if isinstance(counts, Mapping):
        return int(counts["total"]), int(counts.get("activated", counts["total"])), int(counts.get("router", 0))
    if isinstance(counts, (tuple, list)):
        total, activated, router = [*counts, 0, 0][:3]
        return int(total), int(activated or total), int(router)
    return int(counts.total), int(counts.activated), int(counts.router)


def _dtype_bytes(dtype: str | int) -> int:
    if isinstance(dtype, int):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name not in DTYPE_BYTES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPE_BYTES)}")
    return DTYPE_BYTES[name]


def _module_names(
    dims: ModelDims, n_adapted_modules: int, target_modules: Sequence[str], module_shapes: Sequence[Any] | None
) -> list[str]:
    if module_shapes is not None:
        names = [str(getattr(s, "name", s)) for s in module_shapes]
        if len(names) != n_adapted_modules:
            raise ValueError(
                f"n_adapted_modules = {n_adapted_modules} but {len(names)} module shapes were given"
            )
        return names
    targets = list(target_modules)
    if not targets or n_adapted_modules % len(targets):
        raise ValueError(
            f"n_adapted_modules = {n_adapted_modules} is not a multiple of the {len(targets)} "
            f"target modules {targets}; pass module_shapes (the budget's TargetShape list) instead"
        )
    layers = n_adapted_modules // len(targets)
    if layers > dims.layers:
        raise ValueError(
            f"n_adapted_modules = {n_adapted_modules} means {layers} adapted layers of "
            f"{len(targets)} modules, but the model has {dims.layers} layers"
        )
    return [f"layers.{i}.{t}" for i in range(layers) for t in targets]


def _layer_of(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``model.layers.3``: modules of one decoder layer."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ""


def activation_bytes_per_token(
    dims: ModelDims,
    module_names: Sequence[str],
    *,
    seq_len: int,
    compute_bytes: int,
    autocast: bool,
    rank_width: int,
    num_experts: int = 1,
    top_k: int | None = None,
    routed: bool = False,
    gated: bool | None = None,
    shared_rank: int = 0,
    aux_loss: bool = False,
    attention: str = "sdpa",
) -> dict[str, float]:
    """Per-token bytes ``layer`` (``A_layer``), ``adapters`` (``A_adapters``, averaged over
    the adapted layers) and ``norm`` (one RMSNorm's ``(h + 1) · f``); the module
    docstring gives every term."""
    f, c = 4, compute_bytes
    h, q, a, i = dims.hidden, dims.q_dim, dims.heads, dims.intermediate
    norms = 2 * (h + 1) * f
    if attention == "sdpa":
        attn = (2 * q + 2 * q) * c + a * f
    elif attention == "eager":
        attn = (q + 2 * q) * c + a * seq_len * (f + (c if c != f else 0))
    else:
        raise ValueError(f"attention = {attention!r}: expected 'sdpa' or 'eager'")
    mlp = 3 * i * c
    a_layer = norms + attn + mlp

    gated = (num_experts > 1 or routed) if gated is None else gated
    per_layer: dict[str, float] = {}
    shared_inputs: dict[str, set[str]] = {}
    fused_weights = 0.0
    for name in module_names:
        d_in, _ = dims.module_shape(name)
        layer = _layer_of(name)
        b = (2 if gated else 1) * rank_width * c + shared_rank * c
        if routed and top_k is not None:
            b += 3 * num_experts * c + 2 * 8 * top_k
        elif routed:  # soft routing: the softmax output and the scaled dense gate
            b += 2 * num_experts * c
        if routed and not autocast:  # one matmul of the concatenated router and first weights
            fused_weights += d_in * ((shared_rank or rank_width) + num_experts) * f
        if autocast:
            b += d_in * c
        else:
            group, width = dims.input_group(name)
            seen = shared_inputs.setdefault(layer, set())
            if attention == "sdpa":  # the kernel's output is already saved (A_layer)
                seen.add("attn_out")
            if group not in seen:
                seen.add(group)
                b += width * c
        per_layer[layer] = per_layer.get(layer, 0.0) + b
    a_adapters = sum(per_layer.values()) / len(per_layer) if per_layer else 0.0
    return {"layer": a_layer, "adapters": a_adapters, "norm": (h + 1) * f,
            "adapted_layers": len(per_layer), "fused_weights": fused_weights}


def estimate_memory(
    model_config: Mapping[str, Any] | Any,
    counts: Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str = "bfloat16",
    gradient_checkpointing: bool = False,
    n_adapted_modules: int,
    rank_width: int,
    num_experts: int = 1,
    top_k: int | None = None,
    routed: bool = False,
    gated: bool | None = None,
    shared_rank: int = 0,
    aux_loss: bool = False,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    module_shapes: Sequence[Any] | None = None,
    first_adapted_layer: int = 0,
    optimizer: str = "adamw",
    autocast: bool | None = None,
    attention: str = "sdpa",
    answer_positions: int | None = None,
    cuda_context_gib: float = 0.5,
) -> dict[str, float]:
    """Peak GPU memory of one training step, in GiB per term, plus ``allocated`` and ``total``.

    ``model_config``: the base model's ``config.json`` (dict) or a transformers config.
    ``counts``: the run's :class:`ParamCount` (``total`` is the trainable count ``T``; a
    mapping or ``(total, activated, router)`` also works). ``dtype``: the base weights'
    (``model.dtype``); autocast defaults to on for bfloat16/float16, as training does.
    ``n_adapted_modules``: ``M``; ``module_shapes`` (objects with ``name``, e.g. the
    budget's ``TargetShape`` list) gives each module's projection, else ``target_modules``
    in each of the ``M / len(target_modules)`` adapted layers. ``rank_width``: ``W = E·r``
    per module (LoRA: its rank); ``num_experts``/``top_k``/``routed``: the router's
    ``E``, ``k`` and whether there is one; ``gated``: a gate multiplies ``A x`` (default:
    more than one expert); ``shared_rank``: MALoRA's ``r_s``; ``aux_loss``: a
    load-balancing loss on the router probabilities (SiRA; it adds nothing now that the
    loss shares the gate's autograd node, and is kept so rows and callers need not
    change). ``first_adapted_layer``:
    layers below it need no backward. ``attention``: ``sdpa`` (memory-efficient kernels,
    as on CUDA) or ``eager``. ``answer_positions``: where logits are computed (default:
    one per sequence). Every term's formula is in the module docstring.
    """
    dims = ModelDims.from_config(model_config)
    total, _, _ = _counts(counts)
    w = _dtype_bytes(dtype)
    autocast = (w < 4) if autocast is None else autocast
    c = 2 if autocast else w
    names = _module_names(dims, n_adapted_modules, target_modules, module_shapes)
    if not 0 <= first_adapted_layer < dims.layers:
        raise ValueError(f"first_adapted_layer = {first_adapted_layer}: expected 0..{dims.layers - 1}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size = {batch_size}, seq_len = {seq_len}: both must be >= 1")
    per_token = activation_bytes_per_token(
        dims, names, seq_len=seq_len, compute_bytes=c, autocast=autocast, rank_width=rank_width,
        num_experts=num_experts, top_k=top_k, routed=routed, gated=gated, shared_rank=shared_rank,
        aux_loss=aux_loss, attention=attention,
    )
    tokens = batch_size * seq_len
    layers_with_grad = dims.layers - first_adapted_layer
    one_layer = per_token["layer"] + per_token["adapters"]
    if gradient_checkpointing:
        # every layer's input, one layer recomputed in backward, the final norm
        stored = layers_with_grad * dims.hidden * c + one_layer + per_token["norm"]
    else:
        # layers without adapters above the first adapted one still save their activations;
        # the final norm's input and the first layer's first norm (nothing: no gradient) cancel
        stored = layers_with_grad * per_token["layer"] + per_token["adapted_layers"] * per_token["adapters"]
    positions = batch_size if answer_positions is None else answer_positions
    fused = per_token["fused_weights"]
    if gradient_checkpointing:  # one layer's weights at a time, while it is recomputed
        fused /= max(1, per_token["adapted_layers"])
    activations = tokens * stored + positions * dims.vocab * 4
    if optimizer == "adamw":
        states = 8 * total
    elif optimizer == "sgd":
        states = 0
    else:
        raise ValueError(f"optimizer = {optimizer!r}: expected 'adamw' or 'sgd'")
    terms = {
        "base_weights": w * dims.base_parameters(),
        "adapter_params": 4 * total,
        "gradients": 4 * total,
        "optimizer_states": states,
        "autocast_weight_copies": 2 * total if autocast else 0,
        "activations": activations,
        "fused_weight_copies": fused,
        "backward_transient": tokens * one_layer,
        "cuda_context": cuda_context_gib * GIB,
    }
    out = {k: v / GIB for k, v in terms.items()}
    out["allocated"] = sum(v for k, v in out.items() if k != "cuda_context")
    out["total"] = out["allocated"] + out["cuda_context"]
    return out


def fits(total_gib: float, gpu_gib: float, headroom: float = HEADROOM) -> bool:
    """Whether a run of ``total_gib`` fits a GPU of ``gpu_gib`` (``headroom`` of it usable)."""
    return total_gib <= headroom * gpu_gib


# -- budget rows --------------------------------------------------------------------------


def row_shape(row: Any, module_shapes: Sequence[Any] | None = None) -> dict[str, Any]:
    """``rank_width``, ``num_experts``, ``top_k``, ``routed``, ``gated``, ``shared_rank`` and
    ``aux_loss`` of a budget row (a :class:`harness.plan.budget.BudgetRow`, or anything with ``method``,
    ``config`` and ``counts``): from its config's ``num_experts``/``expert_rank``/``top_k``/
    ``shared_rank`` (mixtures), ``rank`` (LoRA), or, for a plugin whose config has neither,
    the effective rank ``(total - router) / sum(d_in + d_out)``."""
    cfg = getattr(row, "config", None)
    experts = getattr(cfg, "num_experts", None)
    rank = getattr(cfg, "expert_rank", None)
    routed = bool(getattr(row, "routed", False))
    if experts is not None and rank is not None:
        top_k = getattr(cfg, "top_k", None)
        shared = getattr(cfg, "shared_rank", None) or 0
        aux = bool(getattr(cfg, "aux_loss_weight", 0) or 0)
        return {"rank_width": experts * rank, "num_experts": experts, "top_k": top_k,
                "routed": routed, "gated": experts > 1 or routed, "shared_rank": shared,
                "aux_loss": aux}
    lora_rank = getattr(cfg, "rank", None)
    if lora_rank is not None:
        return {"rank_width": lora_rank, "num_experts": 1, "top_k": None, "routed": False,
                "gated": False, "shared_rank": 0, "aux_loss": False}
    total, _, router = _counts(row.counts)
    if not module_shapes:
        raise ValueError(f"row {getattr(row, 'method', row)!r}: no expert or rank fields in its "
                         "config; pass module_shapes to derive its effective rank")
    width = sum(s.d_in + s.d_out for s in module_shapes)
    return {"rank_width": max(1, round((total - router) / width)), "num_experts": 1, "top_k": None,
            "routed": routed, "gated": routed, "shared_rank": 0, "aux_loss": False}


def _label(row: Any) -> str:
    label = getattr(row, "label", None)
    if label:
        return str(label)
    variant = getattr(row, "variant", "")
    return f"{getattr(row, 'method', '?')}-{getattr(variant, 'tag', variant)}"


def memory_table(
    rows: Iterable[Any],
    model_config: Mapping[str, Any] | Any,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str = "bfloat16",
    gradient_checkpointing: bool = False,
    n_adapted_modules: int | None = None,
    module_shapes: Sequence[Any] | None = None,
    target_modules: Sequence[str] = LLAMA_TARGETS,
    first_adapted_layer: int = 0,
    optimizer: str = "adamw",
    attention: str = "sdpa",
    gpus: Sequence[float] = GPU_SIZES_GIB,
    headroom: float = HEADROOM,
    cuda_context_gib: float = 0.5,
):
    """One row per budget row: every term of :func:`estimate_memory` (GiB), ``total``, and
    ``fits <N> GB`` for each GPU size in ``gpus`` (``total <= headroom x N``).

    ``rows``: :class:`harness.plan.budget.BudgetRow` objects (``StudyPlan.rows``), or anything
    with ``method``, ``variant``, ``config`` and ``counts``. ``module_shapes``: the
    study's ``TargetShape`` list (``StudyPlan.shapes``); ``n_adapted_modules`` defaults
    to its length. Returns a ``pandas.DataFrame``.
    """
    import pandas as pd

    if n_adapted_modules is None:
        if module_shapes is None:
            raise ValueError("give n_adapted_modules or module_shapes")
        n_adapted_modules = len(module_shapes)
    records = []
    for row in rows:
        shape = row_shape(row, module_shapes)
        total, activated, router = _counts(row.counts)
        est = estimate_memory(
            model_config, row.counts, batch_size=batch_size, seq_len=seq_len, dtype=dtype,
            gradient_checkpointing=gradient_checkpointing, n_adapted_modules=n_adapted_modules,
            module_shapes=module_shapes, target_modules=target_modules,
            first_adapted_layer=first_adapted_layer, optimizer=optimizer, attention=attention,
            cuda_context_gib=cuda_context_gib, **shape,
        )
        record = {
            "run": _label(row),
            "method": getattr(row, "method", None),
            "experts": shape["num_experts"],
            "rank_width": shape["rank_width"],
            "top_k": shape["top_k"] if shape["top_k"] is not None else shape["num_experts"],
            "trainable": total,
            "activated": activated,
            "router": router,
            **{k: est[k] for k in (*TERMS, "allocated", "total")},
        }
        for gpu in gpus:
            record[f"fits {gpu:g} GB"] = fits(est["total"], gpu, headroom)
        records.append(record)
    return pd.DataFrame.from_records(records)


def memory_table_for_study(config: Mapping[str, Any], plan: Any, model_config: Any = None, **overrides: Any):
    """:func:`memory_table` with the settings of a validated study ``config`` and its
    ``plan`` (:class:`harness.plan.study.StudyPlan`: ``rows`` and ``shapes``): batch
    ``train.batch_size``, sequence length ``train.max_length`` (the padded worst case),
    ``model.dtype``, ``train.gradient_checkpointing``, the first adapted layer (the frozen
    layers below it save nothing for backward). ``model_config``: the base model's
    config (dict or transformers config); default: ``model.config_json`` read from disk.
    ``overrides`` go to :func:`memory_table` (e.g. ``batch_size=8``)."""
    if model_config is None:
        path = config["model"].get("config_json")
        if not path:
            raise ValueError("model.config_json is not set; pass model_config (the base model's "
                             "config, e.g. harness.plan.study.planning_model(config['model']).config)")
        model_config = json.loads(Path(path).read_text())
    shapes = list(plan.shapes)
    # the frozen layers below the first adapted one save nothing for backward (cached or not)
    first = min((_layer_index(s.name) for s in shapes), default=0)
    settings = {
        "batch_size": config["train"]["batch_size"],
        # max_length: auto -> the longest item; unknown before tokenising, so a generous bound
        "seq_len": config["train"]["max_length"] if isinstance(config["train"]["max_length"], int) else 512,
        "dtype": config["model"]["dtype"],
        "gradient_checkpointing": bool(config["train"].get("gradient_checkpointing", False)),
        "module_shapes": shapes,
        "first_adapted_layer": first,
    }
    settings.update(overrides)
    return memory_table(plan.rows, model_config, **settings)


def _layer_index(name: str) -> int:
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return 0


def markdown(frame, gpus: Sequence[float] = GPU_SIZES_GIB, digits: int = 1) -> str:
    """The table as Markdown: run, the GiB terms, total, and a yes/no per GPU size."""
    shown = ["base_weights", "adapter_params", "gradients", "optimizer_states",
             "autocast_weight_copies", "activations", "backward_transient", "cuda_context", "total"]
    heads = ["run", "base", "adapter", "grads", "AdamW", "bf16 copies", "activations",
             "bwd transient", "context", "**total GiB**", *[f"{g:g} GB" for g in gpus]]
    lines = ["| " + " | ".join(heads) + " |", "|---|" + "---:|" * (len(heads) - 1)]
    for _, r in frame.iterrows():
        cells = [str(r["run"])] + [f"{r[k]:.{digits}f}" for k in shown[:-1]]
        cells.append(f"**{r['total']:.{digits}f}**")
        cells += ["yes" if r[f"fits {g:g} GB"] else "no" for g in gpus]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = [
    "DTYPE_BYTES",
    "GPU_SIZES_GIB",
    "HEADROOM",
    "LLAMA_TARGETS",
    "TERMS",
    "ModelDims",
    "activation_bytes_per_token",
    "estimate_memory",
    "fits",
    "markdown",
    "memory_table",
    "memory_table_for_study",
    "row_shape",
]

