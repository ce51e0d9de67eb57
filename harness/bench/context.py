"""The benchmark's shared context: the base model (loaded once), one training batch (from the
lower-layer cache and at full depth) and one evaluation batch, the device and its autocast."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.bench.options import BenchOptions
from harness.data.sources import load_item_file, read_items
from harness.data.suite import suite_from_config
from harness.model.base import autocast_context, load_base
from harness.model.load import cache_root, decoder_layers
from harness.model.lower_cache import LowerCache, pad_batch
from harness.plan.config import ConfigError
from harness.run.train import Batcher, batch_schedule, build_examples


@dataclass
class BenchContext:
    config: dict[str, Any]
    options: BenchOptions
    model: nn.Module
    tokenizer: Any
    device: torch.device
    autocast_factory: Callable[[], Any]
    layer_ids: list[int]
    targets: list
    start: int | None
    train_cached: tuple  # batch tensors for the cached upper-layer step
    train_full: tuple  # batch tensors for the full-depth step
    train_tasks: list[str]  # each training row's task (methods with needs_task_labels)
    real_tokens: int
    eval_cached: tuple  # (inputs, mask, rows, cols) for the scoring forward from the cache
    eval_full: tuple  # the same at full depth
    eval_sequences: int
    original_layers: dict[int, nn.Module]
    frozen_tensors: list[torch.Tensor]
    seed: int
    notes: list[str] = field(default_factory=list)

    def autocast(self):
        return self.autocast_factory()


def _bench_items(config: dict[str, Any]) -> tuple[list[dict], list[dict], str]:
    """Training and test items: the study's data if written, else generated (or the JSONL files)."""
    data = config["data"]
    data_dir = Path(config["out_dir"]) / "data"
    if data["source"] == "generated":
        suite = suite_from_config(data)
        train, test, where = suite["train"], suite["test"], "generated suite"
    else:  # files or hub sources, through data.fields (harness.data.sources)
        train, test = ([item for _, item in read_items(data, split)] for split in ("train", "test"))
        where = f"{data.get('dataset', '')} {data.get('train')} / {data.get('test')}".strip()
    if (data_dir / "train.jsonl").exists():
        train, where = load_item_file(data_dir / "train.jsonl"), f"{data_dir / 'train.jsonl'}"
    return train, test, where


def _pad_to(batch: tuple, length: int | None, pad_id: int) -> tuple:
    """Right-pad the batch's inputs and mask to ``length`` positions (``bench.seq_len``)."""
    inputs, mask, rows, cols, targets = batch
    if length is None or inputs.shape[1] >= length:
        return batch
    extra = length - inputs.shape[1]
    if inputs.dim() == 3:
        inputs = torch.cat([inputs, inputs.new_zeros(inputs.shape[0], extra, inputs.shape[2])], 1)
    else:
        inputs = torch.cat([inputs, inputs.new_full((inputs.shape[0], extra), pad_id)], 1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], 1)
    return inputs, mask, rows, cols, targets


def build_context(config: dict[str, Any], options: BenchOptions) -> BenchContext:
    """Load the base model once (:func:`harness.model.base.load_base`, as every job does), build
    one training batch (cached and full depth) and one evaluation batch."""
    model_cfg, train_cfg = config["model"], config["train"]
    torch.set_num_threads(options.threads)
    seed = train_cfg["seeds"][0]
    base = load_base(model_cfg, cache_root(config))
    model, tokenizer, device, start = base.model, base.tokenizer, base.device, base.split_start
    layer_ids, targets = base.layer_ids, base.targets

    train_items, test_items, where = _bench_items(config)
    max_length = options.seq_len or train_cfg["max_length"]
    examples, _ = build_examples(tokenizer, train_items, max_length)
    batch_size = options.batch_size or train_cfg["batch_size"]
    if batch_size > len(examples):
        where = "bench.batch_size" if options.batch_size else "train.batch_size"
        raise ConfigError(f"{where} = {batch_size} exceeds the {len(examples)} training examples; lower it")
    indices = batch_schedule(len(examples), batch_size, seed, 0)
    batch_examples = [examples[i] for i in indices]
    local = list(range(len(batch_examples)))
    pad_id = tokenizer.pad_token_id
    full = _pad_to(Batcher(batch_examples, None, pad_id, device)(local), options.seq_len, pad_id)
    if start is not None:
        lower = LowerCache.build(
            model, [e.ids for e in batch_examples], start, pad_id,
            batch_size=len(batch_examples), desc="lower layers (bench)",
        )
        cached = _pad_to(Batcher(batch_examples, lower, pad_id, device)(local), options.seq_len, pad_id)
    else:
        cached = full
    real_tokens = int(full[1].sum())

    # evaluation: eval.batch_size distinct test prompts, scored where lm-eval scores them
    test_examples, _ = build_examples(tokenizer, test_items, max_length)
    seqs = sorted({tuple(e.ids[:-1]): e for e in test_examples}.items(), key=lambda kv: (len(kv[0]), kv[0]))
    n_eval = min(config["eval"]["batch_size"], len(seqs))
    step = len(seqs) / n_eval
    chosen = [seqs[int(i * step)] for i in range(n_eval)]
    rows = torch.tensor([r for r, (_, e) in enumerate(chosen) for _ in e.positions], device=device)
    cols = torch.tensor([p for _, e in chosen for p in e.positions], device=device)
    eval_ids, eval_mask = pad_batch([list(s) for s, _ in chosen], pad_id)
    eval_full = (eval_ids.to(device), eval_mask.to(device), rows, cols)
    if start is not None:
        lower_eval = LowerCache.build(
            model, [list(s) for s, _ in chosen], start, pad_id, batch_size=n_eval, desc="lower layers (bench eval)"
        )
        hidden, mask = lower_eval.batch(list(range(n_eval)))
        eval_cached = (hidden.to(device), mask.to(device), rows, cols)
    else:
        eval_cached = eval_full

    layers = decoder_layers(model)
    frozen = [p for p in model.parameters()] + [b for b in model.buffers()]
    ctx = BenchContext(
        config=config,
        options=options,
        model=model,
        tokenizer=tokenizer,
        device=device,
        autocast_factory=lambda: autocast_context(device, model_cfg["dtype"]),
        layer_ids=layer_ids,
        targets=targets,
        start=start,
        train_cached=cached,
        train_full=full,
        train_tasks=[e.task for e in batch_examples],
        real_tokens=real_tokens,
        eval_cached=eval_cached,
        eval_full=eval_full,
        eval_sequences=n_eval,
        original_layers={i: layers[i] for i in layer_ids},
        frozen_tensors=frozen,
        seed=seed,
    )
    ctx.notes.append(
        f"data: {where}; training batch {batch_size} x {cached[1].shape[1]} positions "
        f"({real_tokens} real tokens); evaluation batch {n_eval} sequences x {eval_ids.shape[1]} positions"
    )
    return ctx
