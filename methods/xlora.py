"""X-LoRA — Buehler & Buehler 2024, "X-LoRA: Mixture of Low-Rank Adapter Experts, a Flexible
Framework for Large Language Models ...", arXiv 2402.07148 — a scaling head over the study's
frozen task LoRAs, with peft's own classifier (``peft.tuners.xlora``).

Stage one is MoA's (:mod:`methods.composition`): one peft LoRA of rank ``r = R/T`` per task,
the same folders MoA, LoRAHub and Arrow compose. Stage two trains only X-LoRA's classifier.
Every forward runs twice:

1. **the scaling pass**: the model with the task LoRAs switched off (peft's dummy scalings,
   ``scaling_pass_value`` = 0 by default), without gradients, for its last hidden state ``h``
   (``B x S x hidden``, after the final norm);
2. the classifier turns ``h`` into one scaling per token, adapted module ``l`` and task LoRA
   ``t`` (``softmax`` over ``t``), and the real forward uses them::

       s = softmax(W h + b)  reshaped (B, S, L, T);      delta_l(x) = sum_t s_{l,t} · (alpha/r) · B_t A_t x

**What is peft's code.** The classifier is peft's ``XLoraClassifier`` itself (built from a
``peft.XLoraConfig``; its parameters are what trains), the per-layer selection of the
scalings (``top_k_lora``, ``enable_softmax_topk``) is peft's
``XLoraLayer.get_maybe_topk_scalings`` called as is, and the two passes follow
``XLoraModel._enable_peft_forward_hooks``: a forward pre-hook on the model runs the scaling
pass, then hands the scalings to every adapted layer. ``tests/test_composition.py`` holds a
whole model against peft's ``XLoraModel`` over the same task LoRAs and classifier weights.

**What differs from peft's forward, and why** (peft's ``XLoraModel`` cannot be the harness's
model: the engine calls the decoder directly, with cached lower layers):

* **Where the hook sits.** peft registers the pre-hook on the causal LM and reads
  ``hidden_states[-1]`` of its output; the engine calls the decoder (``model.model``) with the
  hidden states of the frozen lower layers (the lower-layer cache) and computes logits only
  where needed, so the hook sits on the decoder (``get_decoder()``; on the module the adapter
  was put in when it has none) and reads ``last_hidden_state``: the same tensor (the final
  norm's output; ``hidden_states[-1]`` is that tensor in transformers 5). Under the lower-layer
  cache the scaling pass re-runs only the adapted upper layers (the layers below are frozen
  and unadapted, so ``h`` is the base model's). When the decoder runs a range of layers that
  holds no X-LoRA layer (the cache being built), there is no scaling pass.
* **The adapter layers.** peft's ``XLoraLinearLayer`` loops over the adapters and scales the
  *input*: ``lora_B(lora_A(dropout(x · s_t))) · scaling``; here the ``T`` LoRAs are rank
  blocks of one layer and the scalings gate the blocks (one matmul down, one up): with no
  dropout (the task LoRAs have none) the same function, ``s_t · scaling · B_t A_t x``, summed
  in another order. In the scaling pass with ``scaling_pass_value = 0`` peft adds
  ``B A (0 · x) · scaling = 0`` to the base output; here the layer returns the base output
  directly (the same numbers, without the matmuls).
* **Layerwise scalings only** (peft's ``layerwise_scalings = True``; peft's default is one
  scaling vector broadcast to every layer) and **depth 1** (peft's default ``xlora_depth``: a
  single ``Linear``). Layerwise, the head's ``T·L x hidden`` weight and ``T·L`` bias are ``L``
  blocks of ``T`` rows, one per adapted module: the per-module parameter accounting of the
  harness counts exactly what the classifier holds. A broadcast head or a deeper MLP has
  parameters shared by all modules, which a per-module budget cannot state.
* **KV cache.** peft sets ``use_cache = False`` for generation; here a forward given a
  ``past_key_values`` is refused (the scaling pass would need the base model's cache, which
  the adapted model's cache is not). Scoring (log-likelihoods) never uses one.
* Frozen task LoRAs (peft's ``use_trainable_adapters = False``, its default).

Budget (per adapted module ``l``, as MoA's with the classifier's rows as the router)::

    router    = T · hidden + T                 (module l's rows of the layerwise head)
    total     = T · r · (d_in + d_out) + router
    activated = k · r · (d_in + d_out) + router     (k = top_k, all T by default: dense)

``hidden`` (option ``hidden_size``) is solved from the adapted modules' shapes (the residual
width, :func:`methods.composition.residual_width`) and checked against the model's config.
Cost beyond the parameters: **one extra forward of the adapted layers per training step and
per scored batch** (no gradient, no backward), stated in the budget table's note.

Stage two: ``head_steps`` (default ``ceil(train.steps / T)``, as MoA's router and LoRAHub's
weights) at ``head_lr`` (default: ``train.lr``), on the whole mixture of the tasks composed.
Other options are peft's ``XLoraConfig`` fields: ``enable_softmax``, ``softmax_temperature``,
``top_k`` (peft's ``top_k_lora``; default none: dense), ``enable_softmax_topk``,
``scaling_pass_value`` and ``global_scaling_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from harness.adapters import (
    BlockMixtureLayer,
    OptionError,
    ParamCount,
    Routing,
    TargetShape,
    register,
)
from harness.adapters.grid import fit_router_counted
from harness.adapters.mixture import mixture_counts
from methods.composition import ComposerConfig, TaskLoraComposer, component_shapes, residual_width


@dataclass
class XLoRAConfig(ComposerConfig):
    """``top_k`` is peft's ``top_k_lora`` (``None``: every task LoRA); the rest are peft's
    ``XLoraConfig`` fields of the same names, and stage two's steps and rate."""

    hidden_size: int | None = None
    enable_softmax: bool = True
    softmax_temperature: float = 1.0
    enable_softmax_topk: bool = False
    scaling_pass_value: float = 0.0
    global_scaling_weight: float = 1.0
    head_steps: int | None = None
    head_lr: float | None = None

    def __post_init__(self) -> None:
        if not self.softmax_temperature > 0:
            raise OptionError(f"xlora option softmax_temperature = {self.softmax_temperature!r}; valid: > 0")
        if self.enable_softmax_topk and self.top_k is None:
            raise OptionError("xlora option enable_softmax_topk needs top_k (peft: top_k_lora)")
        if self.head_lr is not None and not self.head_lr > 0:
            raise OptionError(f"xlora option head_lr = {self.head_lr!r}; valid: > 0, or null for train.lr")
        if self.head_steps is not None and (not isinstance(self.head_steps, int) or self.head_steps < 1):
            raise OptionError(f"xlora option head_steps = {self.head_steps!r}; valid: a positive integer")


def peft_xlora_config(config: XLoRAConfig):
    """peft's ``XLoraConfig`` for the composer (layerwise scalings, depth 1, frozen adapters)."""
    import warnings

    from peft import XLoraConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns on enable_softmax + enable_softmax_topk
        return XLoraConfig(
            hidden_size=config.hidden_size,
            adapters={str(t): str(t) for t in range(config.num_experts)},
            enable_softmax=config.enable_softmax,
            enable_softmax_topk=config.enable_softmax_topk,
            layerwise_scalings=True,
            xlora_depth=1,
            use_trainable_adapters=False,
            softmax_temperature=config.softmax_temperature,
            top_k_lora=config.top_k,
            scaling_pass_value=config.scaling_pass_value,
            global_scaling_weight=config.global_scaling_weight,
        )


class _Float32:
    """What ``XLoraClassifier`` reads its dtype from: float32, as every adapter here."""

    @staticmethod
    def parameters():
        return iter([torch.empty(0)])


class XLoRALayer(BlockMixtureLayer):
    """The ``T`` task LoRAs as rank blocks (frozen), gated by this module's scalings from the
    model-level scaling pass (:class:`ScalingPass`)."""

    has_router = False

    def __init__(self, base_layer: nn.Linear, config: XLoRAConfig, scaling: float):
        super().__init__(base_layer, config, scaling)
        #: this module's index among the adapted modules (peft's ``layer_number``)
        self.layer_number = 0
        self.peft_config = None  # peft's XLoraConfig, set by XLoRA.apply
        #: the last scaling pass's scalings, ``(B, S, L, T)`` (shared by every layer)
        self.scalings: torch.Tensor | None = None
        self.in_scaling_pass = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_scaling_pass and self.config.scaling_pass_value == 0:
            return self.base_layer(x)  # peft: base + B A (0 · x) · scaling, exactly the base
        return super().forward(x)

    def _layer_scalings(self, n_tokens: int, device: torch.device) -> torch.Tensor:
        if self.in_scaling_pass:  # peft's dummy scalings
            return torch.full(
                (n_tokens, 1, self.layer_number + 1, self.num_experts),
                float(self.config.scaling_pass_value), device=device,
            )
        scalings = self.scalings
        if scalings is None:
            raise RuntimeError(
                "an X-LoRA layer ran without scalings: they come from the scaling pass, a forward "
                "pre-hook on the model the adapter was put in (call that model, not the layer)"
            )
        if scalings.shape[0] * scalings.shape[1] != n_tokens:
            raise ValueError(
                f"X-LoRA scalings for {scalings.shape[0]} x {scalings.shape[1]} tokens, but the "
                f"layer saw {n_tokens}"
            )
        return scalings

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        from peft.tuners.xlora.layer import XLoraLayer

        full = self._layer_scalings(x.shape[0], x.device)
        # peft's own selection (top_k_lora, enable_softmax_topk) of this layer's scalings
        peft_layer = SimpleNamespace(config=self.peft_config, layer_number=self.layer_number)
        chosen = XLoraLayer.get_maybe_topk_scalings(peft_layer, full)  # (B, S, T)
        gate = chosen.reshape(-1, self.num_experts) * self.config.global_scaling_weight
        return Routing(gate=gate)


class ScalingPass:
    """The forward pre-hook of X-LoRA's first pass (peft: ``_pre_forward`` in
    ``XLoraModel._enable_peft_forward_hooks``): the hooked module's forward with the task
    LoRAs off and no gradient, its last hidden state through the classifier, the scalings to
    every adapted layer."""

    def __init__(self, classifier: nn.Module, layers: list[XLoRALayer]):
        self.classifier = classifier
        self.layers = layers

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]):
        present = {id(m) for m in module.modules()}
        if not any(id(layer) in present for layer in self.layers):
            return None  # the frozen lower layers alone (the cache being built)
        if kwargs.get("past_key_values") is not None:
            raise RuntimeError(
                "X-LoRA's scaling pass runs the model without its adapters: a key-value cache of "
                "the adapted model cannot serve it (peft's X-LoRA needs use_cache=False as well)"
            )
        pass_kwargs = dict(kwargs)
        if hasattr(getattr(module, "config", None), "use_cache"):
            pass_kwargs["use_cache"] = False
        for layer in self.layers:
            layer.in_scaling_pass = True
        try:
            with torch.no_grad():
                out = module.forward(*args, **pass_kwargs)  # its own hooks (this one) not rerun
        finally:
            for layer in self.layers:
                layer.in_scaling_pass = False
        hidden = last_hidden_state(out)
        scalings = self.classifier(result=SimpleNamespace(hidden_states=(hidden,)), inputs_embeds=hidden)
        for layer in self.layers:
            layer.scalings = scalings
        return None


def last_hidden_state(output: Any) -> torch.Tensor:
    """The last hidden state of a decoder's output (or the output itself, a tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    return hidden if hidden is not None else output[0]


@register
class XLoRA(TaskLoraComposer):
    name = "xlora"
    display_name = "X-LoRA"
    description = (
        "the study's task LoRAs (MoA's stage one), frozen and scaled per token and module by "
        "peft's X-LoRA classifier over the base model's last hidden state (a second, no-grad pass)"
    )
    paper = "Buehler & Buehler 2024, arXiv 2402.07148 (peft's xlora classifier)"
    config_cls = XLoRAConfig
    layer_cls = XLoRALayer

    def solve(self, request, variant, shapes, options=None) -> XLoRAConfig:
        options = dict(options or {})
        hidden = options.pop("hidden_size", None) or residual_width(shapes)
        config = self.solve_composer(request, variant, shapes, options, hidden_size=hidden)
        if request.router == "counted":
            # one LoRA per task: only the per-task rank may shrink, never their number
            config = fit_router_counted(self, config, request, shapes, vary_experts=False)
        return config

    def count(self, config: XLoRAConfig, shape: TargetShape) -> ParamCount:
        head = config.num_experts * config.hidden_size + config.num_experts  # this module's rows
        return mixture_counts(shape, config.num_experts, config.expert_rank, config.top_k, False, extra_router=head)

    def budget_note(self, config: XLoRAConfig) -> str:
        T = config.num_experts
        active = (
            f"dense: all {T} task LoRAs active, activated budget not matched"
            if self.is_dense(config) else f"per-token top-{config.top_k} of {T} task LoRAs"
        )
        return (
            f"stage two: the scaling head only (router: T x hidden + T = {T} x {config.hidden_size} "
            f"+ {T} per module, layerwise); +1 no-grad forward of the adapted layers per step and "
            f"per scored batch (the scaling pass); {active}"
        )

    def describe(self, config: XLoRAConfig) -> dict[str, Any]:
        return {**super().describe(config), "stage2": "head", "passes": 2}

    def apply(self, model: nn.Module, targets: list[TargetShape], config: XLoRAConfig) -> None:
        from peft.tuners.xlora.classifier import XLoraClassifier

        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is not None and hidden != config.hidden_size:
            raise OptionError(
                f"xlora: the classifier reads hidden states of width {config.hidden_size} (solved "
                f"from the adapted modules' shapes), but the model's hidden_size is {hidden}: set "
                f"the option hidden_size: {hidden}"
            )
        super().apply(model, targets, config)
        names = {t.name for t in targets}
        layers = [m for n, m in model.named_modules() if n in names]  # the model's order, as peft's
        peft_config = peft_xlora_config(config)
        for number, layer in enumerate(layers):
            layer.layer_number = number
            layer.peft_config = peft_config
        classifier = XLoraClassifier(
            _Float32(), peft_config, config.num_experts, len(layers), layers[0].lora_A.device
        )
        model.add_module("xlora_classifier", classifier)
        get_decoder = getattr(model, "get_decoder", None)
        scope = get_decoder() if callable(get_decoder) else model
        scope.register_forward_pre_hook(ScalingPass(classifier, layers), with_kwargs=True)

    def compose_config(self, components, options) -> XLoRAConfig:
        """X-LoRA over existing task-adapter folders (in block order); ``options`` may set
        ``top_k`` and the other options (``hidden_size`` defaults to the folders' residual width)."""
        values = self.compose_values(components, options)
        values.setdefault("hidden_size", residual_width(component_shapes(components[0])))
        values.setdefault("head_steps", values.get("task_steps"))
        return self.make_config(**values)

    def training_steps(self, config: XLoRAConfig, default_steps: int) -> int:
        if config.head_steps is not None:
            return config.head_steps
        return max(1, math.ceil(default_steps / config.num_experts))

    def learning_rate(self, config: XLoRAConfig, default_lr: float) -> float | None:
        return config.head_lr


__all__ = ["ScalingPass", "XLoRA", "XLoRAConfig", "XLoRALayer", "last_hidden_state", "peft_xlora_config"]
