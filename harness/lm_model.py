"""The lm-eval model class for this harness: ``lm_eval --model moe-lora --model_args run_dir=<folder>``.

Scores any run folder (a trained adapter, or the untrained base model) with
lm-eval's own tokenisation rules (:class:`lm_eval.api.model.TemplateLM`). Each
request is scored on the sequence ``(context + continuation)[:-1]``; sequences
are deduplicated (all choices of a single-token multiple-choice question share
one sequence: the context) and, when only the top layers are adapted, the frozen
lower layers come from a cache shared by every run on the same prompts, so they
are computed once per study instead of once per run. Both give exactly the
numbers of a full-depth forward (``tests/test_e2e.py``, ``tests/test_split.py``).

With ``record_routing`` on (the harness's own evaluation sets it), every routed layer's
per-token expert shares are gathered per lm-eval task while scoring:
:meth:`HarnessLM.routing_record` says which experts each task's sequences used.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from lm_eval.api.model import TemplateLM
from tqdm.auto import tqdm

from harness.adapters.routing import RoutingRecord
from harness.runtime import autocast_context
from harness.split import cached_lower, full_forward, logits_at, pad_batch, upper_forward


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
    shares averaged over its real tokens) and the number of sequences."""

    def __init__(self):
        self.seq_tasks: list[tuple[str, ...]] = []
        self.sums: dict[str, dict[str, torch.Tensor]] = {}
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
            per_seq = (per_token.view(*mask.shape, -1).float() * real.unsqueeze(-1)).sum(1) / count
            per_seq = per_seq.cpu()
            sums = self.sums.setdefault(module, {})
            for row, seq in enumerate(seq_ids):
                for task in self.seq_tasks[seq]:
                    if task in sums:
                        sums[task] += per_seq[row]
                    else:
                        sums[task] = per_seq[row].clone()

    def record(self) -> RoutingRecord | None:
        if not self.sums:
            return None
        shares = {
            module: {t: [round(float(v), 6) for v in s / self.sequences[t]] for t, s in by_task.items()}
            for module, by_task in self.sums.items()
        }
        return RoutingRecord(shares=shares, sequences=dict(self.sequences))


class HarnessLM(TemplateLM):
    """Registered in lm-eval's model registry as ``moe-lora`` (see ``harness_lm_eval_hook``)."""

    def __init__(
        self,
        run_dir: str | None = None,
        batch_size: int | str = 64,
        device: str = "auto",
        lower_cache: bool | str = True,
        threads: int | str | None = None,
        **_: Any,
    ):
        super().__init__()
        if run_dir is None:
            raise ValueError(
                "the moe-lora model needs a run folder: --model_args run_dir=<out_dir>/runs/<run id>"
            )
        from harness.run_model import load_run_model

        if threads:
            torch.set_num_threads(int(threads))
        self.run = load_run_model(run_dir, device=device if device not in (None, "None") else "auto")
        self.model = self.run.model
        self.tokenizer = self.run.tokenizer
        self.device_ = next(self.model.parameters()).device
        self.autocast_dtype = self.run.spec["model"].get("dtype", "float32")
        self.batch_size_ = 64 if batch_size in (None, "auto") else int(str(batch_size).split(":")[0])
        self.use_cache = str(lower_cache).lower() not in ("false", "0", "no")
        self.max_length = int(getattr(self.model.config, "max_position_embeddings", 2048))
        #: gather each task's expert shares while scoring (off for plain lm_eval use)
        self.record_routing = False
        self._request_tasks: list[str] | None = None
        self._routing: RoutingAccumulator | None = None

    # -- TemplateLM interface -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

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

    def _real_tokens(self, mask: torch.Tensor):
        """Mark the batch's real tokens for the adapter layers (no-op for the base model)."""
        handle = self.run.handle
        return nullcontext() if handle is None else handle.token_mask(mask)

    def _recording(self):
        handle = self.run.handle
        if not self.record_routing or handle is None:
            return nullcontext()
        return handle.recording_routing()

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scored: list[tuple[tuple[int, ...], int, list[int]]] = []
        for _, context_enc, continuation_enc in requests:
            whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
            seq = tuple(whole[:-1])
            scored.append((seq, len(seq) - len(continuation_enc), continuation_enc))
        unique = sorted({s for s, _, _ in scored}, key=lambda s: (len(s), s))
        index = {s: i for i, s in enumerate(unique)}
        if self.record_routing and self.run.handle is not None:
            tasks: list[dict[str, None]] = [{} for _ in unique]
            names = self._request_tasks or [""] * len(scored)
            for (seq, _, _), task in zip(scored, names):
                tasks[index[seq]].setdefault(task, None)
            self._routing = self._routing or RoutingAccumulator()
            self._routing.start([tuple(t) for t in tasks])
        start = self.run.split_start if self.use_cache else None
        cache = None
        if start is not None:
            cache = cached_lower(
                self.model,
                self.run.fingerprint,
                unique,
                start,
                self.tokenizer.pad_token_id,
                self.run.cache_dir,
                desc="lower layers (eval)",
            )
        # positions needed per unique sequence
        wanted: dict[int, set[int]] = {}
        for seq, first, cont in scored:
            wanted.setdefault(index[seq], set()).update(range(first, first + len(cont)))
        logprobs: dict[tuple[int, int], torch.Tensor] = {}
        for b in tqdm(
            range(0, len(unique), self.batch_size_),
            desc=f"scoring {self.run.spec['run_id']}",
            disable=disable_tqdm,
            mininterval=2,
        ):
            ids = list(range(b, min(b + self.batch_size_, len(unique))))
            if cache is not None:
                inputs, mask = cache.batch(ids)
            else:
                inputs, mask = pad_batch([unique[i] for i in ids], self.tokenizer.pad_token_id)
            rows, cols, keys = [], [], []
            for row, i in enumerate(ids):
                for pos in sorted(wanted[i]):
                    rows.append(row)
                    cols.append(pos)
                    keys.append((i, pos))
            mask = mask.to(self.device_)
            # routers that pool over a sequence must not see the padding
            with self._real_tokens(mask), self._recording(), autocast_context(self.device_, self.autocast_dtype):
                scores = score_logprobs(
                    self.model,
                    inputs.to(self.device_),
                    mask,
                    start if cache is not None else None,
                    torch.tensor(rows, device=self.device_),
                    torch.tensor(cols, device=self.device_),
                )
                if self.record_routing and self.run.handle is not None:
                    self._routing.add(self.run.handle.routing_shares(), mask, ids)
            for key, row in zip(keys, scores.cpu()):
                logprobs[key] = row
        results = []
        for seq, first, cont in scored:
            i = index[seq]
            rows = [logprobs[(i, first + j)] for j in range(len(cont))]
            ll = sum(float(r[t]) for r, t in zip(rows, cont))
            greedy = all(int(r.argmax()) == t for r, t in zip(rows, cont))
            results.append((ll, greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        raise NotImplementedError(
            "the moe-lora model scores loglikelihood (multiple-choice) tasks; perplexity tasks "
            "are not implemented"
        )

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding with the adapted model (full depth), stopping at ``until`` strings."""
        out = []
        for request in tqdm(requests, desc="generating", disable=disable_tqdm):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or [self.tokenizer.decode([self.eot_token_id])]
            if isinstance(until, str):
                until = [until]
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            ids = torch.tensor([self.tok_encode(context)], device=self.device_)
            with autocast_context(self.device_, self.autocast_dtype):
                generated = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new,
                    do_sample=False,
                    pad_token_id=self.tokenizer.pad_token_id,
                )
            text = self.tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            out.append(text)
        return out
