"""GraLoRA — Jung et al. 2025, "GraLoRA: Granular Low-Rank Adaptation for Parameter-Efficient
Fine-Tuning", arXiv 2505.20355 — through peft itself (``peft.tuners.gralora``, peft >= 0.18).

The weight update of a rank-``R`` LoRA is split into a ``k x k`` grid of blocks, each with its
own low-rank pair of rank ``R/k``: with ``x = [x_1 .. x_k]`` (``d_in/k`` each) and the output
cut into ``k`` slices of ``d_out/k``,

    delta(x)_i = (alpha / R) · sum_j B_ij A_ij x_j,    A_ij: R/k x d_in/k,  B_ij: d_out/k x R/k

(peft stores ``A_j = [A_1j; ..; A_kj]`` as one ``R x d_in/k`` pair per input slice and
``B_i`` likewise). The total is ``k²·(R/k)·(d_in + d_out)/k = R·(d_in + d_out)``: exactly
LoRA rank ``R``'s parameters, at ``k`` times LoRA's rank (``k·R``). ``k = 1`` is LoRA rank
``R``. A granularity axis *inside* one adapter, without a router: every block is used for
every token (dense).

The layer is peft's own ``gralora.Linear`` (``peft.inject_adapter_in_model`` with a
``peft.GraloraConfig``: no dropout, ``hybrid_r = 0``, ``init_weights = True``: A
Kaiming-uniform, B zero, an exact no-op start), not a reimplementation; its parameters are
kept in float32 whatever the base model's dtype, as every method here.
``tests/test_new_methods.py`` holds peft's forward against the block formula above.
``export_peft`` writes peft's own adapter folder (``PeftModel.from_pretrained`` loads it;
``--merge`` uses peft's ``merge_and_unload``: the update is one fixed matrix per layer).

Budget: rank ``R`` (the same total as every mixture, no router); one variant per ``k`` of the
option ``ks`` (default: those of 2, 4, 8 that divide ``R``; the paper recommends ``k = 2`` up
to rank 32, ``k = 4`` from rank 64). ``k`` must divide ``R`` and every adapted module's ``d_in`` and ``d_out``
(peft's requirement); a ``k`` that does not is refused by the solver with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from harness.adapters import (
    BudgetError,
    Method,
    MethodConfig,
    OptionError,
    ParamCount,
    TargetShape,
    Variant,
    register,
)

#: the k of the study's rows when ``ks`` is not set (the paper's settings)
DEFAULT_KS = (2, 4, 8)


@dataclass
class GraLoRAConfig(MethodConfig):
    rank: int = 8
    k: int = 2
    #: the k of the study's rows (``None``: those of 2, 4, 8 that divide R)
    ks: list[int] | None = None


def peft_gralora_config(config: GraLoRAConfig, targets: list[TargetShape]):
    from peft import GraloraConfig

    return GraloraConfig(
        r=config.rank,
        gralora_k=config.k,
        alpha=config.alpha,
        hybrid_r=0,
        gralora_dropout=0.0,
        target_modules=[t.name for t in targets],
        bias="none",
        init_weights=True,
    )


def check_k(rank: int, k: int, shapes: list[TargetShape]) -> None:
    """Raise :class:`BudgetError` unless ``k`` divides ``rank`` and every module's dimensions."""
    if not isinstance(k, int) or k < 1:
        raise OptionError(f"gralora: k must be a positive integer, got {k!r}")
    if rank % k:
        divisors = [d for d in range(1, rank + 1) if rank % d == 0]
        raise BudgetError(
            f"gralora k={k} does not divide total_rank {rank} (each of the k x k blocks has rank "
            f"R/k); valid k for R={rank}: {divisors}"
        )
    bad = [s for s in shapes if s.d_in % k or s.d_out % k]
    if bad:
        s = bad[0]
        raise BudgetError(
            f"gralora k={k} does not divide module {s.name!r} ({s.d_in} -> {s.d_out}): GraLoRA "
            "cuts the input and output into k equal slices"
        )


@register
class GraLoRA(Method):
    name = "gralora"
    display_name = "GraLoRA"
    description = "peft's GraLoRA: LoRA rank R cut into k x k blocks with their own rank-R/k pairs"
    paper = "Jung et al. 2025, arXiv 2505.20355 (peft's gralora tuner)"
    config_cls = GraLoRAConfig
    routed = False
    dense = True
    sweeps_granularity = False
    mergeable = True  # delta(x) = D x with peft's get_delta_weight: one fixed matrix per layer

    def variants(self, request, options=None) -> list[Variant]:
        """One row per ``k`` of ``ks``; without ``ks``, those of the paper's 2, 4, 8 that divide
        ``R`` (a ``k`` given in ``ks`` that does not is refused by :meth:`solve`)."""
        ks = (options or {}).get("ks")
        if ks is None:
            ks = [k for k in DEFAULT_KS if request.total_rank % k == 0]
        if not ks or len(set(ks)) != len(ks):
            raise OptionError(
                f"gralora: ks must be a non-empty list of distinct k, got {ks!r} (without ks: "
                f"those of {list(DEFAULT_KS)} that divide total_rank {request.total_rank})"
            )
        return [Variant(k, f"k{k}") for k in ks]

    def count(self, config: GraLoRAConfig, shape: TargetShape) -> ParamCount:
        n = config.rank * (shape.d_in + shape.d_out)
        return ParamCount(total=n, activated=n, router=0)

    def solve(self, request, variant, shapes, options=None) -> GraLoRAConfig:
        k = variant.granularity
        check_k(request.total_rank, k, shapes)
        return self.configure(options, alpha=request.alpha, rank=request.total_rank, k=k)

    def describe(self, config: GraLoRAConfig) -> dict[str, Any]:
        return {
            "num_experts": 1,
            "expert_rank": config.rank,
            "top_k": 1,
            "blocks": f"{config.k}x{config.k} of rank {config.rank // config.k}",
        }

    def export_peft(self, config: GraLoRAConfig, state, targets, folder, base_model: str) -> None:
        """peft's own GraLoRA adapter folder (``adapter_config.json`` +
        ``adapter_model.safetensors`` with the keys ``save_pretrained`` writes:
        ``base_model.model.<module>.gralora_A``), loadable by ``PeftModel.from_pretrained``."""
        folder = Path(folder)
        peft_config = peft_gralora_config(config, targets)
        peft_config.base_model_name_or_path = base_model
        peft_config.save_pretrained(str(folder))
        tensors = {
            "base_model.model." + name.removesuffix(".default"): value.contiguous()
            for name, value in state.items()
            if "gralora_" in name
        }
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    def apply(self, model: nn.Module, targets: list[TargetShape], config: GraLoRAConfig) -> None:
        from peft import inject_adapter_in_model

        check_k(config.rank, config.k, targets)
        inject_adapter_in_model(peft_gralora_config(config, targets), model)
        for name, param in model.named_parameters():
            param.requires_grad_("gralora_" in name)
            if "gralora_" in name and param.is_floating_point():
                # as for peft's LoRA (methods/lora.py): float32 adapters on a bf16 model
                param.data = param.data.float()


__all__ = ["GraLoRA", "GraLoRAConfig"]
