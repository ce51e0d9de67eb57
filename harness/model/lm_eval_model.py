"""The lm-eval model class for this harness: ``lm_eval --model moe-lora --model_args run_dir=<folder>``.

:class:`HarnessLM` is lm-eval's own :class:`~lm_eval.models.huggingface.HFLM` over a run's
adapted model (``pretrained=<model>``): lm-eval's tokenisation, request batching, rolling
windows for perplexity tasks (``loglikelihood_rolling``) and batched greedy generation
(``generate_until``) are HFLM's. The harness changes two things, both in
:meth:`HarnessLM._loglikelihood_tokens` (every log-likelihood request type, rolling windows
included, goes through it):

* **the frozen lower-layer cache**: when only the top layers are adapted, the hidden
  states entering the first adapted layer come from a cache shared by every run of the
  study on the same sequences, so the frozen layers run once per study instead of once
  per run, and logits are computed only at the scored positions (the output head over
  every position would dominate a CPU evaluation). Identical numbers to HFLM's full-depth
  forward (``tests/test_split.py``, ``tests/test_identity.py``);
* **the routing record** (``record_routing``, set by the harness's own evaluation): each
  routed layer's per-token expert shares are gathered per lm-eval task while scoring
  (:meth:`HarnessLM.routing_record`).

Generation runs HFLM's batched, left-padded ``generate`` at full depth; a router that pools
over a sequence (MoA) then routes each new token on its own.
"""

from __future__ import annotations

import logging
import sys
from contextlib import nullcontext
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from harness import checkout_warning
from harness.adapters.routing import RoutingRecord
from harness.model.base import autocast_context
from harness.model.lower_cache import (
    cached_lower,
    full_forward,
    logits_at,
    pad_batch,
    upper_forward,
)
from harness.model.run_folder import load_run_model
from harness.model.tokens import SCORING_WINDOW

#: the longest sequence scored or generated (rolling windows of perplexity tasks)
DEFAULT_MAX_LENGTH = SCORING_WINDOW
#: tokens of one scoring batch (short multiple-choice prompts fill ``batch_size`` first;
#: rolling windows of 2048 tokens are 8 to a batch)
TOKENS_PER_BATCH = 16_384
#: positions whose logits (vocabulary-sized) are computed at once
POSITIONS_PER_CHUNK = 2_048


def score_logprobs(
    model: torch.nn.Module,
    inputs: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int | None,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """The scoring forward of one batch: log-probabilities ``(len(rows), vocab)`` at the
    positions ``(rows[i], cols[i])``. ``inputs`` are the cached hidden states entering
    layer ``start``, or token ids when ``start`` is None (full depth). The benchmark
    times this function (``python -m harness bench``)."""
    if start is not None:
        hidden = upper_forward(model, inputs, attention_mask, start)
    else:
        hidden = full_forward(model, inputs, attention_mask)
    return torch.log_softmax(logits_at(model, hidden, rows, cols).float(), dim=-1)


class RoutingAccumulator:
    """Per (module, task): the sum of each scored sequence's expert shares (its per-token
    shares averaged over its real tokens), of its experts per token (how many experts a real
    token was routed to, averaged over the sequence), and the number of sequences."""

    def __init__(self):
        self.seq_tasks: list[tuple[str, ...]] = []
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
        self.active: dict[str, dict[str, float]] = {}
        self.sequences: dict[str, int] = {}

    def start(self, seq_tasks: list[tuple[str, ...]]) -> None:
        """A scoring call begins: its unique sequences belong to these tasks (lm-eval may
        score in several calls; sums and counts accumulate over them)."""
        self.seq_tasks = seq_tasks
        for tasks in seq_tasks:
            for t in tasks:
                self.sequences[t] = self.sequences.get(t, 0) + 1

    def add(self, shares: dict[str, torch.Tensor], mask: torch.Tensor, seq_ids: list[int]) -> None:
        real = mask.float()  # (B, L)
        count = real.sum(1, keepdim=True).clamp_min(1.0)
        for module, per_token in shares.items():
            per_token = per_token.view(*mask.shape, -1).float()
            per_seq = ((per_token * real.unsqueeze(-1)).sum(1) / count).cpu()
            experts = (((per_token > 0).float().sum(-1) * real).sum(1) / count.squeeze(1)).cpu()
            sums = self.sums.setdefault(module, {})
            active = self.active.setdefault(module, {})
            for row, seq in enumerate(seq_ids):
                for task in self.seq_tasks[seq]:
                    if task in sums:
                        sums[task] += per_seq[row]
                    else:
                        sums[task] = per_seq[row].clone()
                    active[task] = active.get(task, 0.0) + float(experts[row])

    def record(self) -> RoutingRecord | None:
        if not self.sums:
            return None
        shares = {
            module: {t: [round(float(v), 6) for v in s / self.sequences[t]] for t, s in by_task.items()}
            for module, by_task in self.sums.items()
        }
        active = {
            module: {t: round(v / self.sequences[t], 6) for t, v in by_task.items()}
            for module, by_task in self.active.items()
        }
        return RoutingRecord(shares=shares, sequences=dict(self.sequences), active=active)


def _flag(name: str, value: bool | str) -> bool:
    """A boolean model argument (lm-eval passes ``--model_args`` values as strings)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"model argument {name}={value!r}: use true or false")


class HarnessLM(HFLM):
    """lm-eval's ``HFLM`` over a run folder's model; registered in lm-eval's model registry as
    ``moe-lora`` (see ``harness_lm_eval_hook``). ``run_dir``: the run folder (its
    ``run.json`` and adapter); ``lower_cache``: use the frozen lower-layer cache (default);
    ``threads``: torch CPU threads; ``trust_plugins``: import the plugin modules ``run.json``
    names when the run's method is not built in (never without it: a run folder does not decide
    which code runs); other arguments as HFLM's (``batch_size``, ``max_length``)."""

    def __init__(
        self,
        run_dir: str | None = None,
        batch_size: int | str = 64,
        device: str = "auto",
        lower_cache: bool | str = True,
        threads: int | str | None = None,
        max_length: int | str | None = None,
        trust_plugins: bool | str = False,
        **kwargs: Any,
    ):
        if run_dir is None:
            raise ValueError(
                "the moe-lora model needs a run folder: --model_args run_dir=<out_dir>/runs/<run id>"
            )
        warning = checkout_warning("lm-eval's moe-lora model")
        if warning:  # lm_eval from a second clone: the hook imports whichever harness sys.path finds
            print(warning, file=sys.stderr)
        if threads:
            torch.set_num_threads(int(threads))
        self.run = load_run_model(run_dir, device=device if device not in (None, "None") else "auto",
                                  trust_plugins=_flag("trust_plugins", trust_plugins))
        dtype = self.run.spec["model"].get("dtype", "float32")
        hf_logger = logging.getLogger("lm_eval.models.huggingface")
        level = hf_logger.level
        hf_logger.setLevel(logging.ERROR)  # "pretrained is not a str": passing a model is the point
        try:
            super().__init__(
                pretrained=self.run.model,
                tokenizer=self.run.tokenizer,
                backend="causal",
                batch_size=64 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0]),
                max_length=int(max_length) if max_length else DEFAULT_MAX_LENGTH,
                add_bos_token=False,  # as training tokenises (harness.model.tokens)
                mixed_precision_dtype=None if dtype == "float32" else dtype,
            )
        finally:
            hf_logger.setLevel(level)
        self.autocast_dtype = dtype
        self.use_cache = str(lower_cache).lower() not in ("false", "0", "no")
        #: gather each task's expert shares while scoring (off for plain lm_eval use)
        self.record_routing = False
        self._request_tasks: list[str] | None = None
        self._routing: RoutingAccumulator | None = None

    def get_model_info(self) -> dict[str, Any]:
        spec = self.run.spec
        return {
            "harness_run_id": spec["run_id"],
            "harness_method": spec["method"],
            "harness_method_config": spec["method_config"],
            "harness_base_model": spec["model"]["source"],
        }

    def routing_record(self) -> RoutingRecord | None:
        """Which experts each lm-eval task's scored sequences used (``record_routing``
        must have been on while scoring); ``None`` when nothing routes per token."""
        return None if self._routing is None else self._routing.record()

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        # remember each request's task: _loglikelihood_tokens gets them in the same order
        self._request_tasks = [getattr(r, "task_name", None) or "" for r in requests]
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._request_tasks = None

    def _adapters(self, mask: torch.Tensor):
        """Mark the batch's real tokens for the adapter layers and, when asked, record their
        routing (no-ops for the base model)."""
        handle = self.run.handle
        if handle is None:
            return nullcontext(), nullcontext()
        recording = handle.recording_routing() if self.record_routing else nullcontext()
        return handle.token_mask(mask), recording

    def _batches(self, unique: list[tuple[int, ...]]) -> list[list[int]]:
        """Consecutive groups of the (length-sorted) unique sequences: at most ``batch_size``
        sequences and :data:`TOKENS_PER_BATCH` tokens each (rolling windows are long)."""
        batches, current, tokens = [], [], 0
        for i, seq in enumerate(unique):
            if current and (len(current) == self.batch_size or tokens + len(seq) > TOKENS_PER_BATCH):
                batches.append(current)
                current, tokens = [], 0
            current.append(i)
            tokens += len(seq)
        return batches + ([current] if current else [])

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Every log-likelihood request (``((context, continuation), context ids, continuation
        ids)``), rolling windows included: each is scored on the sequence
        ``(context + continuation)[:-1]``; sequences are deduplicated (the choices of a
        single-token multiple-choice question share one), the frozen lower layers come from
        the study's cache, and only the continuation tokens' log-probabilities are kept."""
        scored: list[tuple[tuple[int, ...], int, list[int]]] = []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            seq = tuple(whole[:-1])
            scored.append((seq, len(seq) - len(continuation_enc), continuation_enc))
        unique = sorted({s for s, _, _ in scored}, key=lambda s: (len(s), s))
        index = {s: i for i, s in enumerate(unique)}
        record = self.record_routing and self.run.handle is not None and self._request_tasks is not None
        if record:
            tasks: list[dict[str, None]] = [{} for _ in unique]
            for (seq, _, _), task in zip(scored, self._request_tasks):
                tasks[index[seq]].setdefault(task, None)
            self._routing = self._routing or RoutingAccumulator()
            self._routing.start([tuple(t) for t in tasks])
        start = self.run.split_start if self.use_cache else None
        cache = None
        if start is not None:
            cache = cached_lower(
                self.model, self.run.fingerprint, unique, start, self.tokenizer.pad_token_id,
                self.run.cache_dir, desc="lower layers (eval)",
            )
        # per unique sequence: the positions scored and the tokens wanted at each
        wanted: dict[int, dict[int, set[int]]] = {}
        for seq, first, cont in scored:
            at = wanted.setdefault(index[seq], {})
            for j, token in enumerate(cont):
                at.setdefault(first + j, set()).add(token)
        device = self.model.device
        # (sequence, position) -> (the greedy token, {wanted token: its log-probability})
        found: dict[tuple[int, int], tuple[int, dict[int, float]]] = {}
        for ids in tqdm(self._batches(unique), desc=f"scoring {self.run.spec['run_id']}",
                        disable=disable_tqdm, mininterval=2):
            if cache is not None:
                inputs, mask = cache.batch(ids)
            else:
                inputs, mask = pad_batch([unique[i] for i in ids], self.tokenizer.pad_token_id)
            keys = [(i, pos) for i in ids for pos in sorted(wanted[i])]
            rows = [row for row, i in enumerate(ids) for _ in wanted[i]]
            mask = mask.to(device)
            real_tokens, recording = self._adapters(mask)  # routers must not see the padding
            with real_tokens, recording, autocast_context(device, self.autocast_dtype):
                hidden = (
                    upper_forward(self.model, inputs.to(device), mask, start)
                    if cache is not None
                    else full_forward(self.model, inputs.to(device), mask)
                )
                if record:
                    self._routing.add(self.run.handle.routing_shares(), mask, ids)
                for c in range(0, len(keys), POSITIONS_PER_CHUNK):
                    chunk = keys[c : c + POSITIONS_PER_CHUNK]
                    logprobs = torch.log_softmax(
                        logits_at(
                            self.model, hidden,
                            torch.tensor(rows[c : c + POSITIONS_PER_CHUNK], device=device),
                            torch.tensor([pos for _, pos in chunk], device=device),
                        ).float(),
                        dim=-1,
                    ).cpu()
                    for (i, pos), row in zip(chunk, logprobs):
                        found[(i, pos)] = (int(row.argmax()), {t: float(row[t]) for t in wanted[i][pos]})
        results = []
        for seq, first, cont in scored:
            i = index[seq]
            parts = [found[(i, first + j)] for j, _ in enumerate(cont)]
            results.append(
                (sum(p[1][t] for p, t in zip(parts, cont)), all(p[0] == t for p, t in zip(parts, cont)))
            )
        return results
