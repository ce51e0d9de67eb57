"""LoRA — Hu et al. 2021, arXiv 2106.09685 — through peft itself, the reference baseline.

    delta(x) = (alpha / r) · B A x,   A: r x d_in (Kaiming-uniform, a = sqrt 5),  B: d_out x r (zero)

The adapter is inserted by ``peft.inject_adapter_in_model`` with a
``peft.LoraConfig`` (no dropout, no bias), i.e. peft's own ``lora.Linear``
layers, not a reimplementation. Its parameters are kept in float32 whatever the base
model's dtype (``inject_adapter_in_model`` would create them in bf16 on a bf16 model,
unlike every other method here); bf16 compute comes from autocast. A study always runs two references: rank ``R``
(the same total parameters as every mixture) and rank ``K`` (the same
activated parameters as the sparse mixtures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from harness.adapters import Method, MethodConfig, ParamCount, TargetShape, Variant, register


@dataclass
class LoRAConfig(MethodConfig):
    rank: int = 8


def peft_lora_config(config: LoRAConfig, targets: list[TargetShape]):
    from peft import LoraConfig

    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=[t.name for t in targets],
        lora_dropout=0.0,
        bias="none",
        init_lora_weights=True,
    )


@register
class LoRA(Method):
    name = "lora"
    display_name = "LoRA"
    description = "peft's LoRA; references at rank R (same total) and rank K (same activated)"
    paper = "Hu et al. 2021, arXiv 2106.09685"
    config_cls = LoRAConfig
    routed = False
    dense = True
    sweeps_granularity = False
    is_reference = True
    mergeable = True

    def variants(self, request, options=None) -> list[Variant]:
        return [
            Variant(1, f"r{request.total_rank}", request.total_rank, "rank R (same total)", "R"),
            Variant(1, f"r{request.active_rank}", request.active_rank, "rank K (same activated)", "K"),
        ]

    def count(self, config: LoRAConfig, shape: TargetShape) -> ParamCount:
        n = config.rank * (shape.d_in + shape.d_out)
        return ParamCount(total=n, activated=n, router=0)

    def solve(self, request, variant, shapes, options=None) -> LoRAConfig:
        rank = variant.rank if variant.rank is not None else request.total_rank
        return self.configure(options, alpha=request.alpha, rank=rank)

    def describe(self, config: LoRAConfig) -> dict[str, Any]:
        return {"num_experts": 1, "expert_rank": config.rank, "top_k": 1}

    def export_peft(self, config: LoRAConfig, state, targets, folder, base_model: str) -> None:
        """peft's own adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``,
        the keys ``save_pretrained`` writes: ``base_model.model.<module>.lora_A.weight``)."""


        folder = Path(folder)
        peft_config = peft_lora_config(config, targets)
        peft_config.base_model_name_or_path = base_model
        peft_config.save_pretrained(str(folder))
        tensors = {
            "base_model.model." + name.replace(".default.", "."): value.contiguous()
            for name, value in state.items()
            if "lora_" in name
        }
        save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})

    def apply(self, model: nn.Module, targets: list[TargetShape], config: LoRAConfig) -> None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(peft_lora_config(config, targets), model)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
            if "lora_" in name and param.is_floating_point():
                # peft creates the adapter in the base layer's dtype (bf16 on a bf16 model);
                # every method trains float32 adapters (bf16 compute comes from autocast)
                param.data = param.data.float()
