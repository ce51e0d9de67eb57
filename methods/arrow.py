"""Arrow — Ostapenko et al. 2024, "Towards Modular LLMs by Building and Reusing a Library of
LoRAs", arXiv 2405.11157 — training-free routing over the study's task LoRAs, with peft's own
prototypes (``peft.tuners.lora.arrow``, peft >= 0.18: ``ArrowConfig``, ``create_arrow_model``).

Stage one is MoA's (:mod:`methods.composition`): one peft LoRA of rank ``r = R/T`` per task,
the same folders MoA, LoRAHub and X-LoRA compose. Stage two trains **nothing**. In every
adapted module, each task LoRA ``t`` gets a prototype ``p_t`` (``d_in``), the top right
singular vector of ``B_t A_t``, and each token ``x`` routes itself::

    s_t = |x · p_t|;   S = top-k of s;   c = softmax(s_S / temperature)  (0 outside S)
    delta(x) = sum_{t in S} c_t · (alpha / r) · B_t A_t x

**What is peft's code.** The prototypes are computed by peft's
``ArrowLoraLinearLayer.build_prototypes`` itself (its power iteration on ``Aᵀ (Bᵀ B) A``,
15 steps from a start vector drawn with ``rng_seed``), from the loaded blocks, once, when the
task LoRAs are loaded; they are a buffer of the layer (saved with the run). The routing is
the formula of ``ArrowLoraLinearLayer.forward`` (top-k of ``|x Pᵀ|``, then a softmax over all
``T`` with ``-inf`` outside the top-k, exactly as peft writes it), and the sum over the chosen
LoRAs is the harness's block-gated core (one matmul down, the gates, one matmul up) instead of
peft's per-expert ``einsum`` (which builds a ``tokens x T x d_out`` tensor): the same function,
summed in another order. ``tests/test_composition.py`` holds this layer against
``ArrowLoraLinearLayer.forward`` on tiny tensors and a whole model against
``create_arrow_model`` over the same task LoRAs (the prototypes bit-identical, the outputs to
float rounding).

**What differs from peft's Arrow model, and why.**

* peft's ``create_arrow_model`` adds an ``arrow_router`` LoRA adapter to every module whose
  *leaf name* the task LoRAs target (``q_proj`` ...), in every decoder layer, with trainable
  but unused ``lora_A``/``lora_B`` of its own. Over task LoRAs that cover only some layers
  (the harness adapts the top layers) it fails (a layer with no task LoRA has no prototypes).
  Here the composer is a layer of the harness on exactly the adapted modules, with no unused
  parameters.
* ``rng_seed`` defaults to 0 (peft: ``None``, a start vector from the global RNG, so the
  prototypes are not reproducible); the option is peft's.
* General-knowledge subtraction (``use_gks``) needs general-domain LoRAs; the suite has none,
  so it is off (peft's default) and not offered.
* Dropout: peft applies the task LoRAs' dropout to the mixed output; the harness's task LoRAs
  have none.
* **The training stage.** The harness trains every run with at least one optimizer step, and
  AdamW refuses an empty parameter list. Arrow's layer therefore holds one *zero-element*
  parameter (``anchor``, no number in it), added to the routing weights as ``anchor.sum()``
  (an exact ``+ 0.0``), and its run takes one step (``training_steps = 1``): that step's
  forward and backward change nothing (AdamW updates no element), and its logged loss is the
  composed model's loss on the first batch. A "compose only" path in the engine (no optimizer,
  zero steps) would remove the step; until then the step costs one forward and backward.

Budget (per adapted module): total = the ``T`` task LoRAs, ``T·r·(d_in + d_out)`` = LoRA rank
``R``'s; router **0** (no stage-two parameter; the ``T x d_in`` prototypes are buffers computed
from the task LoRAs); activated ``k·r·(d_in + d_out)``. ``top_k`` defaults to ``K / r`` (the
activated budget of LoRA rank ``K``, as MoA's), not to peft's 3; the option ``top_k`` sets
another, and ``top_ks: [1, 3]`` runs one row per ``k`` (tags ``T6k1``, ``T6k3``; the budget
table shows each one's activated count against LoRA rank ``K``'s). No extra forward pass: every token is
routed inside each module from that module's input.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from harness.adapters import (
    BlockMixtureLayer,
    BudgetError,
    OptionError,
    ParamCount,
    Routing,
    TargetShape,
    Variant,
    register,
)
from harness.adapters.mixture import mixture_counts
from methods.composition import ComposerConfig, TaskLoraComposer


@dataclass
class ArrowComposerConfig(ComposerConfig):
    """peft's ``ArrowConfig`` fields the composer uses: ``router_temperature`` and ``rng_seed``
    (``top_k`` is the mixture's); ``top_ks``: the study's rows, one per ``k``."""

    router_temperature: float = 1.0
    rng_seed: int | None = 0
    #: one row per k (variants ``T{T}k{k}``) instead of one ``top_k``
    top_ks: list[int] | None = None

    def __post_init__(self) -> None:
        if not self.router_temperature > 0:
            raise OptionError(f"arrow_lora option router_temperature = {self.router_temperature!r}; valid: > 0")
        if self.rng_seed is not None and (not isinstance(self.rng_seed, int) or isinstance(self.rng_seed, bool)):
            raise OptionError(f"arrow_lora option rng_seed = {self.rng_seed!r}; valid: an integer or null")


def peft_prototypes(blocks_A: list[torch.Tensor], blocks_B: list[torch.Tensor], rng_seed: int | None) -> torch.Tensor:
    """``(T, d_in)`` prototypes of the task LoRAs ``(A_t, B_t)`` by peft's own
    ``ArrowLoraLinearLayer.build_prototypes`` (power iteration, ``rng_seed``)."""
    from peft import ArrowConfig
    from peft.tuners.lora.arrow import ArrowLoraLinearLayer

    names = [f"task_{t}" for t in range(len(blocks_A))]
    arrow_config = ArrowConfig(top_k=1, rng_seed=rng_seed)
    arrow_config.task_adapter_names = names
    arrow = ArrowLoraLinearLayer(in_features=blocks_A[0].shape[1], arrow_config=arrow_config)
    arrow.build_prototypes(
        {n: SimpleNamespace(weight=a) for n, a in zip(names, blocks_A)},
        {n: SimpleNamespace(weight=b) for n, b in zip(names, blocks_B)},
    )
    return arrow.prototypes


class ArrowLayer(BlockMixtureLayer):
    """The ``T`` task LoRAs as rank blocks (frozen), routed per token by their prototypes."""

    has_router = False

    def __init__(self, base_layer: nn.Linear, config: ArrowComposerConfig, scaling: float):
        super().__init__(base_layer, config, scaling)
        self.temperature = config.router_temperature
        #: the task LoRAs' top right singular vectors (:meth:`build_prototypes`)
        self.register_buffer("prototypes", torch.zeros(config.num_experts, self.in_features))
        #: no number in it: the engine's optimizer step needs a parameter (module docstring)
        self.anchor = nn.Parameter(torch.zeros(0))

    @torch.no_grad()
    def build_prototypes(self) -> None:
        """Fill :attr:`prototypes` from the loaded blocks with peft's code."""
        r = self.expert_rank
        blocks_A = [self.lora_A[t * r : (t + 1) * r] for t in range(self.num_experts)]
        blocks_B = [self.lora_B[:, t * r : (t + 1) * r] for t in range(self.num_experts)]
        self.prototypes.copy_(peft_prototypes(blocks_A, blocks_B, self.config.rng_seed))

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        # peft's ArrowLoraLinearLayer.forward, steps 1 and 2
        sim = torch.abs(x @ self.prototypes.to(x.dtype).T)  # (N, T), sign-agnostic
        top_v, index = torch.topk(sim, self.top_k or self.num_experts, dim=1)
        full = torch.full_like(sim, float("-inf")).scatter(1, index, top_v)
        coeff = torch.softmax(full / self.temperature, dim=1)
        weight = coeff.gather(1, index) + self.anchor.sum()  # + 0.0: see the module docstring
        return Routing(index=index, weight=weight)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", temperature={self.temperature:g}"


@register
class Arrow(TaskLoraComposer):
    name = "arrow_lora"  # "arrow" alone names other things in the engine (a datasets builder)
    display_name = "Arrow"
    description = (
        "the study's task LoRAs (MoA's stage one) routed per token without training: top-k "
        "by the LoRAs' top right singular vectors (peft's Arrow prototypes)"
    )
    paper = "Ostapenko et al. 2024, arXiv 2405.11157 (peft's ArrowConfig / create_arrow_model)"
    config_cls = ArrowComposerConfig
    layer_cls = ArrowLayer

    def default_top_k(self, request, r: int, T: int) -> int | None:
        """``K / r`` task LoRAs: LoRA rank ``K``'s activated parameters, as MoA's top-k."""
        if request.active_rank % r:
            feasible = [r * j for j in range(1, T + 1)]
            raise BudgetError(
                f"arrow_lora with T={T} task LoRAs of rank r = R/T = {r}: top-k = active_rank/r = "
                f"{request.active_rank}/{r} is not a whole number of LoRAs; feasible active ranks: "
                f"{feasible}; or set the option top_k"
            )
        return request.active_rank // r

    def variants(self, request, options=None) -> list[Variant]:
        """One row (``T{T}``), or with the option ``top_ks`` one row per ``k`` (``T{T}k{k}``)."""
        rows = super().variants(request, options)
        top_ks = (options or {}).get("top_ks")
        if top_ks is None:
            return rows
        if (not isinstance(top_ks, list) or not top_ks or len(set(top_ks)) != len(top_ks)
                or (options or {}).get("top_k") is not None):
            raise OptionError(
                f"arrow_lora option top_ks = {top_ks!r}; valid: a non-empty list of distinct k "
                "(one row each), instead of top_k"
            )
        return [Variant(v.granularity, f"{v.tag}k{k}") for v in rows for k in top_ks]

    def solve(self, request, variant, shapes, options=None) -> ArrowComposerConfig:
        # no router: the same parameters under router: separate and counted
        options = dict(options or {})
        if options.get("top_ks") is not None:
            options["top_k"] = int(variant.tag.rpartition("k")[2])  # the row's k (variants)
        return self.solve_composer(request, variant, shapes, options)

    def count(self, config: ArrowComposerConfig, shape: TargetShape) -> ParamCount:
        return mixture_counts(shape, config.num_experts, config.expert_rank, config.top_k, False)

    def budget_note(self, config: ArrowComposerConfig) -> str:
        k, T = config.top_k or config.num_experts, config.num_experts
        return (
            f"training-free: no stage-two parameter (T x d_in prototypes per module, from the task "
            f"LoRAs at load); no extra forward pass; per-token top-{k} of {T} task LoRAs"
        )

    def describe(self, config: ArrowComposerConfig) -> dict[str, Any]:
        return {**super().describe(config), "stage2": "none", "passes": 1}

    def load_components(self, handle, components) -> None:
        super().load_components(handle, components)
        for target in handle.targets:
            handle.model.get_submodule(target.name).build_prototypes()

    def compose_config(self, components, options) -> ArrowComposerConfig:
        """Arrow over existing task-adapter folders (in block order); ``options`` may set
        ``top_k`` (default 1), ``router_temperature`` and ``rng_seed``."""
        values = self.compose_values(components, options)
        if values["top_k"] is None:
            values["top_k"] = 1
        return self.make_config(**values)

    def training_steps(self, config: ArrowComposerConfig, default_steps: int) -> int:
        return 1  # a step that changes nothing (module docstring)


__all__ = ["Arrow", "ArrowComposerConfig", "ArrowLayer", "peft_prototypes"]
