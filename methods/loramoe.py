"""LoRAMoE — Dou et al. 2023, "LoRAMoE: Alleviate World Knowledge Forgetting in Large Language
Models via MoE-Style Plugin", arXiv 2312.09979; code github.com/Ablustrund/LoRAMoE
(``peft/tuners/lora.py``: ``Linear.forward``, ``Linear.cv_squared``).

Soft-routed LoRA experts (every expert for every token):

    delta(x) = sum_e softmax(W_g x)_e · (alpha / r) · B_e A_e x

plus the **localized balancing constraint** (LBC), an auxiliary loss on each adapted module.
The experts are split into two groups (the first ``floor(E/2)``, the rest) and every
training sequence ``m`` has a type ``t_m`` (1: a "world knowledge" task, 0: any other):

    I[m, e] = sum over the real tokens of sequence m of softmax(W_g x)_e        (importance)
    Q[m, e] = 1 + delta  if (e in the first group) == (t_m == 1),  else 1 - delta
    Z = I ⊙ Q,      L_lbc = beta · Var(Z) / (Mean(Z)^2 + 1e-10)

(``Var`` unbiased, over all ``B·E`` entries of ``Z``: the squared coefficient of variation,
as the authors' ``cv_squared``). The loss is handed to the training loop with
``add_aux_loss`` and summed over all adapted modules, as the authors add each layer's loss.

Mapping to the study's budget: ``E = G`` experts of rank ``R/G`` (the total of LoRA rank
``R``, router listed beside). The routing is dense, so the activated budget is not matched
(the tables say "dense").

Choices where the paper or code is silent or that the harness needs (all configurable):

* ``balance_weight`` (beta) and ``balance_alpha`` (delta): the released script
  ``run_loramoe.sh`` sets both to 0 (no constraint) and the README gives no value. The
  default here is **beta = 0.1, delta = 0.1** (our choice, so that the method's defining
  constraint is on); ``balance_weight: 0`` is the released script's setting.
* The sequence types come from the task names: ``knowledge_tasks`` lists the training
  tasks of type 1 (default: none, so every sequence is of type 0 and the constraint is a
  cv² balance of the experts' importance with the second group weighted ``1+delta``).
  The method sets ``needs_task_labels``; without labels (evaluation) there is no loss.
* Padding tokens do not count in the importance (the authors' sum runs over every
  position of the padded batch). With an odd number of experts the second group has one
  more (the authors' code needs an even number).
* Router initialised Kaiming-uniform (``a = sqrt 5``) as in the authors' code; the
  softmax is taken in float32 (theirs too) and cast to the adapter's dtype. No dropout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from harness.adapters import (
    BlockMixtureLayer,
    BlockMixtureMethod,
    MixtureConfig,
    OptionError,
    Routing,
    kaiming_uniform_like_peft,
    register,
)
from harness.adapters.distributed import across_ranks, world_size

#: the authors' ``cv_squared`` epsilon
CV_EPS = 1e-10


@dataclass
class LoRAMoEConfig(MixtureConfig):
    balance_weight: float = 0.1
    balance_alpha: float = 0.1
    knowledge_tasks: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.balance_weight < 0:
            raise OptionError(f"loramoe balance_weight must be >= 0, got {self.balance_weight!r}")
        if not 0 <= self.balance_alpha < 1:
            raise OptionError(f"loramoe balance_alpha must be in [0, 1), got {self.balance_alpha!r}")


def localized_balance_loss(
    gate: torch.Tensor,
    types: torch.Tensor,
    token_mask: torch.Tensor | None,
    alpha: float,
) -> torch.Tensor:
    """``cv²(I ⊙ Q)`` (unweighted) for per-token gates ``gate`` (``(N, E)``, ``N = B·T``),
    sequence types ``types`` (``(B,)``, 1 = the first expert group's type) and the token mask.

    Under several ranks it is computed from the sums ``Σz``, ``Σz²`` and the count of ``Z``'s
    entries (float64, ``across_ranks``), so that it is the global batch's cv²; in one process
    it is the authors' ``z.var() / (z.mean()² + eps)``."""
    n_seq, n_experts = types.shape[0], gate.shape[-1]
    g = gate.float()
    if token_mask is not None:
        g = g * token_mask.to(g.dtype).unsqueeze(-1)
    importance = g.view(n_seq, -1, n_experts).sum(1)  # (B, E)
    first = torch.arange(n_experts, device=gate.device) < n_experts // 2
    match = (types.to(gate.device) == 1).unsqueeze(-1) == first.unsqueeze(0)
    coef = torch.where(match, 1.0 + alpha, 1.0 - alpha)
    z = (importance * coef).flatten()
    if world_size() == 1:  # one process: the authors' formula, as committed runs computed it
        return z.var() / (z.mean() ** 2 + CV_EPS)
    z = z.double()

    def cv_squared(s1: torch.Tensor, s2: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        mean = s1 / m
        return ((s2 - s1 * mean) / (m - 1)) / (mean**2 + CV_EPS)

    m = torch.tensor(float(z.numel()), dtype=z.dtype, device=z.device)
    return across_ranks(cv_squared, z.sum(), (z * z).sum(), m).float()


class LoRAMoELayer(BlockMixtureLayer):
    config: LoRAMoEConfig

    def __init__(self, base_layer, config, scaling):
        super().__init__(base_layer, config, scaling)
        kaiming_uniform_like_peft(self.router.weight)  # the authors' router init
        self.task_labels: torch.Tensor | None = None  # set by the handle while training

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        cfg = self.config
        gate = torch.softmax(self.router_logits(x).float(), dim=-1)
        labels = self.task_labels
        if self.training and cfg.balance_weight > 0 and labels is not None and gate.numel() > 1:
            loss = localized_balance_loss(gate, labels, token_mask, cfg.balance_alpha)
            self.add_aux_loss(cfg.balance_weight * loss, name="lbc")
        return Routing(gate=gate.to(x.dtype))


@register
class LoRAMoE(BlockMixtureMethod):
    name = "loramoe"
    display_name = "LoRAMoE"
    description = "soft-routed LoRA experts in two groups with a localized balancing constraint (cv² aux loss)"
    paper = "Dou et al. 2023, arXiv 2312.09979 (github.com/Ablustrund/LoRAMoE)"
    config_cls = LoRAMoEConfig
    layer_cls = LoRAMoELayer
    needs_task_labels = True

    def uses_top_k(self, options) -> bool:
        return False  # dense soft routing, as the paper

    def task_label_ids(self, config: LoRAMoEConfig, tasks: list[str]) -> torch.Tensor:
        """Each sequence's type: 1 for a task in ``knowledge_tasks``, else 0."""
        knowledge = set(config.knowledge_tasks)
        return torch.tensor([int(t in knowledge) for t in tasks], dtype=torch.long)

    def describe(self, config: LoRAMoEConfig):
        return {**super().describe(config), "lbc": f"beta={config.balance_weight:g},delta={config.balance_alpha:g}"}
