"""MoA's layer: the ``T`` task LoRAs as rank blocks of one block-gated layer, and a router.

    delta(x) = sum_{t in topk(W_g pool(x))} g_t · (alpha / r) · B_t A_t x

``g``: softmax over the ``k`` selected logits (with ``k = 1`` the chosen adapter acts
at full strength). See :mod:`methods.moa` for the method, the budget and the choices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harness.adapters import BlockMixtureLayer, Routing
from harness.adapters.distributed import across_ranks, reduce_across_ranks

LEVELS = ("sequence", "token")


class MoALayer(BlockMixtureLayer):
    """The ``T`` task LoRAs as rank blocks (frozen in stage two) and a router.

    Context set by :class:`~harness.adapters.inject.AdapterHandle` while a forward runs:
    ``token_mask`` (real tokens), ``prompt_mask`` (the prompt's tokens, training only)
    and ``task_labels`` (each sequence's task index, training only). Test and analysis
    hook: ``force_expert = j`` routes every token to adapter ``j`` with gate 1.
    At sequence level, the routing statistics (load, the recorded per-token shares) count
    sequences: every token of a sequence carries its sequence's choice.
    """

    def __init__(self, base_layer: nn.Linear, config, scaling: float):
        super().__init__(base_layer, config, scaling)
        self.level = config.level
        self.prompt_mask: torch.Tensor | None = None
        self.task_labels: torch.Tensor | None = None
        self.force_expert: int | None = None
        #: each module's supervision term is divided by the number of adapted modules
        self.supervision_scale = 1.0
        self._sequences = (1, 0)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        # the leading dimensions are (batch, sequence); a 2-D input is one sequence
        length = x.shape[-2] if x.dim() >= 3 else x.shape[0]
        self._sequences = (x.shape[:-1].numel() // max(length, 1), length)
        return super().delta(x)

    def _select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.force_expert is not None:
            index = torch.full(
                (logits.shape[0], 1), int(self.force_expert), dtype=torch.long, device=logits.device
            )
            return index, torch.ones(index.shape, dtype=logits.dtype, device=logits.device)
        values, index = logits.topk(self.top_k or self.num_experts, dim=-1)
        return index, torch.softmax(values, dim=-1)

    def _supervise(
        self, logits: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor | None
    ) -> None:
        """Cross-entropy of the router logits against the task labels, averaged over the
        labelled (and valid) rows; a weighted mean, so no host sync and no empty case
        (under several ranks: over the global batch's rows)."""
        keep = (labels >= 0).float()
        if valid is not None:
            keep = keep * valid
        per_row = F.cross_entropy(logits.float(), labels.clamp_min(0), reduction="none")
        loss = across_ranks(lambda s, c: s / c.clamp_min(1.0), (per_row * keep).sum(), keep.sum())
        self.add_aux_loss(self.config.router_supervision * self.supervision_scale * loss)

    def _labels(self, n_sequences: int, device: torch.device) -> torch.Tensor | None:
        labels = self.task_labels
        if labels is None or not self.training or self.config.router_supervision <= 0:
            return None
        if labels.numel() != n_sequences:
            raise ValueError(
                f"{labels.numel()} task labels for a batch of {n_sequences} sequences"
            )
        return labels.reshape(-1).to(device=device, dtype=torch.long)

    def route(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> Routing:
        n_seq, length = self._sequences
        prompt = self.prompt_mask
        if prompt is not None:
            if prompt.numel() != x.shape[0]:
                raise ValueError(
                    f"prompt mask has {prompt.numel()} entries but the layer saw {x.shape[0]} tokens"
                )
            prompt = prompt.reshape(-1).to(device=x.device, dtype=torch.bool)
        else:
            prompt = token_mask
        labels = self._labels(n_seq, x.device)
        if self.level == "sequence":
            # the router is linear: the logits of the mean prompt token are the mean of the
            # tokens' logits, pooled over T columns instead of d_in
            token_logits = self.router_logits(x).view(n_seq, length, -1)
            if prompt is None:
                logits, seq_valid = token_logits.mean(1), None
            else:
                weight = prompt.view(n_seq, length).to(token_logits.dtype)
                logits = (token_logits * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True).clamp_min(1)
                seq_valid = prompt.view(n_seq, length).any(1)
            index, weight = self._select(logits)
            if labels is not None:
                self._supervise(logits, labels, seq_valid)
            index = index.repeat_interleave(length, dim=0)
            weight = weight.repeat_interleave(length, dim=0)
            return Routing(index=index, weight=weight)
        logits = self.router_logits(x)  # (N, T)
        index, weight = self._select(logits)
        if labels is not None:
            self._supervise(logits, labels.repeat_interleave(length), token_mask)
        return Routing(index=index, weight=weight)

    def expert_load(self) -> torch.Tensor | None:
        """At sequence level: the share of sequences routed to each adapter (the choice is
        repeated over a sequence's tokens; only sequences with a real token count)."""
        if self._routing is None or self.level != "sequence" or self._routing_mask is None:
            return super().expert_load()
        n_seq, length = self._sequences
        first = self._routing.index.view(n_seq, length, -1)[:, 0]
        seq_valid = self._routing_mask.view(n_seq, length).any(1)
        counts = torch.zeros(self.num_experts, dtype=torch.float32, device=first.device)
        counts.index_add_(0, first.reshape(-1), seq_valid.float().repeat_interleave(first.shape[1]))
        counts = reduce_across_ranks(counts)  # the global batch's shares under several ranks
        return counts / counts.sum().clamp_min(1.0)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", level={self.level}"
