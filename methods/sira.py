"""SiRA — Zhu et al. 2023, "Sparse Mixture of Low Rank Adaptation", arXiv 2311.09179.

    delta(x) = sum_{e in topk(W_g x)} d(g_e) · (alpha / r) · B_e A_e x,
    g = softmax over the k selected logits,  d = expert dropout (training only)

* **Capacity**: each expert takes at most ``C = ceil(cf · k · T / E)`` tokens
  per batch (``T`` real tokens); an assignment past capacity skips that expert
  (its gate is zeroed, the others are not renormalised). Priority: all first
  choices before any second choice, earlier tokens first (GShard's order).
* **Expert dropout**: dropout with rate ``expert_dropout`` on the gate output,
  inverted scaling (``torch.nn.functional.dropout``), active only in training.
* **Auxiliary loss** (optional): Switch Transformer's load-balancing loss
  ``E · sum_e f_e P_e`` times ``aux_loss_weight``.

Choices where the paper is silent (configurable): capacity is applied in
training only (``capacity_in_eval: false``), so an evaluated token's output never
depends on the other tokens in its batch; padding consumes no capacity.

Several ranks (``train.processes``): capacity is decided per rank, over that rank's shard
of the global batch (as GShard and Switch decide it per device group); the auxiliary
loss's load shares are the global batch's (``switch_coefficients`` sums the counts over
the ranks). The one-process reference of an ``N``-rank run decides capacity over ``N``
equal shards of its batch (``harness.adapters.distributed.simulated_shards``). Expert
dropout draws its masks per rank: the same distribution, not the same draws (set
``expert_dropout: 0`` to compare ``N`` ranks with one number for number).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.adapters import BlockMixtureLayer, BlockMixtureMethod, MixtureConfig, Routing, register
from harness.adapters.distributed import shards
from harness.adapters.routing import (
    assignment_slots,
    expert_capacity,
    load_balancing_loss_from_counts,
    routing_dtype,
    switch_coefficients,
    topk_gate,
    topk_index,
    topk_softmax,
)


@dataclass
class SiRAConfig(MixtureConfig):
    capacity_factor: float = 1.25
    expert_dropout: float = 0.1
    aux_loss_weight: float = 0.01
    capacity_in_eval: bool = False


class SiRALayer(BlockMixtureLayer):
    config: SiRAConfig

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        cfg, k = self.config, self.top_k
        logits = self.router_logits(x)
        if not (self.training or cfg.capacity_in_eval):
            index, weight = topk_softmax(logits, k)
            return Routing(index=index, weight=weight)
        index = topk_index(logits, k)
        tokens = self.token_batch(token_mask)
        n_shards = shards()
        if n_shards == 1:
            slots, counts = assignment_slots(index, self.num_experts, token_mask, tokens)
            capacity = tokens.memo(  # the same for every layer of this forward
                ("sira capacity", cfg.capacity_factor, k, self.num_experts),
                lambda: expert_capacity(
                    cfg.capacity_factor, k, tokens.count(x.shape[0], x.device), self.num_experts
                ).float(),
            )
        else:
            slots, counts, capacity = self._shard_capacity(index, token_mask, tokens, n_shards)
        keep = slots <= capacity
        gate_mask = keep.to(routing_dtype(logits))
        if self.training and cfg.expert_dropout > 0:  # inverted dropout: F.dropout's draw
            noise = torch.empty(gate_mask.shape, dtype=gate_mask.dtype, device=gate_mask.device)
            noise.bernoulli_(1 - cfg.expert_dropout)
            gate_mask = gate_mask * noise.div_(1 - cfg.expert_dropout)
        aux_coef = None
        if self.training and cfg.aux_loss_weight > 0:
            aux_coef = switch_coefficients(counts, k, tokens, x.shape[0], cfg.aux_loss_weight)
        if self.path == "dense":  # gates and loss as one autograd node
            gate, aux = topk_gate(
                logits, index, gate_mask, tokens.weights(x.shape[0], x.device), aux_coef
            )
            if aux is not None:
                self.add_aux_loss(aux)
            return Routing(gate=gate, index=index, keep=keep)
        _, weight = topk_softmax(logits, k)
        if aux_coef is not None:
            self.add_aux_loss(load_balancing_loss_from_counts(
                torch.softmax(logits, dim=-1), counts, k, tokens, cfg.aux_loss_weight
            ))
        return Routing(index=index, weight=weight * gate_mask.to(weight.dtype), keep=keep)

    def _shard_capacity(self, index, token_mask, tokens, n_shards: int):
        """Queue places, global counts and capacities when ``n_shards`` equal consecutive
        shards of the batch each decide capacity on their own (one expert queue per shard
        and expert; capacity from the shard's real tokens): ``(slots, counts, capacity)``,
        ``capacity`` ``(N, 1)`` per token."""
        n, e = index.shape[0], self.num_experts
        if n % n_shards:
            raise ValueError(f"{n} tokens do not split into {n_shards} equal shards")
        shard = torch.arange(n, device=index.device) // (n // n_shards)
        slots, shard_counts = assignment_slots(index + (shard * e).unsqueeze(-1), e * n_shards, token_mask, tokens)
        real = tokens.weights(n, index.device).view(n_shards, -1).sum(1)
        capacity = expert_capacity(self.config.capacity_factor, self.top_k, real, e).float()
        return slots, shard_counts.view(n_shards, e).sum(0), capacity[shard].unsqueeze(-1)


@register
class SiRA(BlockMixtureMethod):
    name = "sira"
    display_name = "SiRA"
    description = "sparse top-k LoRA experts with per-expert capacity, expert dropout and aux loss"
    paper = "Zhu et al. 2023, arXiv 2311.09179"
    config_cls = SiRAConfig
    layer_cls = SiRALayer
