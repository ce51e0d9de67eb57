"""MoA — Mixture-of-LoRAs, Feng et al. 2024, "Mixture-of-LoRAs: An Efficient Multitask
Tuning for Large Language Models", arXiv 2403.03432.

Two training stages:

1. **Task adapters.** One peft LoRA of rank ``r`` per task ``t = 1..T`` of the training
   mixture, each trained only on its own task's items (``A_t``: ``r x d_in``,
   ``B_t``: ``d_out x r``), so heterogeneous tasks cannot interfere while they train.
   Each is its own Snakemake job (``train_task_adapter``), in
   ``{out_dir}/task_adapters/{task}-r{r}-s{seed}-{hash8}/``.
2. **Router.** The ``T`` LoRAs are stacked as rank blocks of one block-gated layer
   (:class:`~harness.methods.mixture.BlockMixtureLayer`), frozen, and only a router
   per adapted module trains, on the whole mixture::

       delta(x) = sum_{t in topk(W_g pool(x))} g_t · (alpha / r) · B_t A_t x

   ``g``: softmax over the ``k`` selected logits, so with ``k = 1`` the chosen adapter
   acts at full strength, exactly as that task's LoRA alone (the paper selects one
   LoRA per input). The router then learns from the task-label loss only, which
   therefore must be on (``router_supervision > 0``) when ``k = 1``. (Weighting the
   chosen adapter by its full-softmax probability, Switch-style, was tried first: the
   task loss then rewards whichever adapter is already chosen, the router stayed at
   chance on the default study, and an unsure router scaled the adapter down to ~1/T.)

Budget (per adapted module, the same accounting as every routed method)::

    r = R / T,   k = K / r            (both must be whole numbers, else BudgetError)
    total     = T · r · (d_in + d_out) + T · d_in      (all task adapters + router)
    activated = k · r · (d_in + d_out) + T · d_in      (the adapters a token uses + router)
    router    = T · d_in

so with ``router: separate`` the total equals LoRA rank ``R``'s and the activated count
LoRA rank ``K``'s exactly. "Trainable" means across both stages: the stacked task
LoRAs are trained in stage one and frozen in stage two, and they are counted in
``total`` (the layer holds them as parameters; ``verify_counts`` and
``apply_method``'s check see them all). The variant tag is ``T{T}`` and the
granularity ``T``, so MoA lands in the granularity figure at ``x = T``.

Where the paper is silent, or where this implementation deviates (all configurable):

* **One router per adapted module** (``T x d_in``, no bias, normal(0, 0.02)), reading
  that module's input, like the other routed methods here, rather than one router
  for the whole model; this keeps ``router: separate|counted`` accounting unchanged.
* ``level: sequence`` (default): one choice per sequence, scored from the mean of the
  module's input over the sequence's prompt tokens (real tokens up to the first
  trained answer position; at evaluation, every real token of the scored sequence).
  The answer tokens never steer the routing in training, so training and lm-eval's
  scoring route on the same prompt. ``level: token``: every token routes itself.
* ``router_supervision`` (default 1.0): weight of a cross-entropy loss between the
  router logits and the item's task index, as the paper's domain-label loss; at
  sequence level on the pooled logits, at token level on every real token. It is
  averaged over the adapted modules (each module's term is divided by their number),
  delivered through the auxiliary-loss hook; the labels reach the layers through
  ``AdapterHandle.task_labels`` because the method sets ``needs_task_labels``.
* ``task_steps`` (default ``ceil(train.steps / n_tasks)``, ``n_tasks`` the number of
  tasks in the study's training data): each task adapter gets the share of optimizer
  steps its task gets in one joint run, so the stage-one total equals one joint run's
  steps when every task has an adapter. The default does not depend on the ``tasks``
  option, so dropping a task from that option leaves every other task adapter (and its
  folder name) unchanged. With ``train.epochs`` instead of steps: the epochs over the
  task's own items.
* ``router_steps`` (default ``ceil(train.steps / T)``; with epochs, a ``1/T`` share of
  the joint run's steps): stage two's optimizer steps, same lr, schedule and batch.
* ``tasks`` (default: every task of the training data): the tasks that get an adapter,
  in router order; the router trains on those tasks' items only.
* Same seed for every task adapter of a run (initialisation and batch order, as for
  any run of that seed); learning rate, schedule, batch size and alpha are the study's.
* Every test item's task must have an adapter for its router accuracy to count;
  items of other tasks are left out of ``router_accuracy`` (they are still scored).
* Generation (``generate_until``) with a KV cache routes each new token on its own at
  sequence level; the suite's log-likelihood scoring is unaffected.

``python -m harness compose`` builds a MoA run from any compatible task-adapter folders
(stage two only), so an adapter can be dropped or a newly trained one added.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from harness.methods.base import BudgetError, Variant
from harness.methods.mixture import BlockMixtureLayer, BlockMixtureMethod, MixtureConfig, Routing
from harness.methods.registry import register
from harness.methods.routing import selection_share

LEVELS = ("sequence", "token")
TASK_ADAPTER_DIR = "task_adapters"


@dataclass
class MoAConfig(MixtureConfig):
    """``num_experts = T`` task adapters of rank ``expert_rank = r``, ``top_k = k`` active."""

    tasks: list[str] | None = None
    level: str = "sequence"
    router_supervision: float = 1.0
    task_steps: int | None = None
    router_steps: int | None = None
    router_lr: float | None = 0.01

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"moa option level = {self.level!r}; valid: {', '.join(LEVELS)}")
        if not self.router_supervision >= 0:
            raise ValueError(
                f"moa option router_supervision = {self.router_supervision!r}; valid: >= 0"
            )
        if self.router_lr is not None and not self.router_lr > 0:
            raise ValueError(f"moa option router_lr = {self.router_lr!r}; valid: > 0, or null for train.lr")
        for name in ("task_steps", "router_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"moa option {name} = {value!r}; valid: a positive integer")


# -- the layer -------------------------------------------------------------------------------


class MoALayer(BlockMixtureLayer):
    """The ``T`` task LoRAs as rank blocks (frozen in stage two) and a router.

    Context set by :class:`~harness.methods.inject.AdapterHandle` while a forward runs:
    ``token_mask`` (real tokens), ``prompt_mask`` (the prompt's tokens, training only)
    and ``task_labels`` (each sequence's task index, training only). Test and analysis
    hooks: ``force_expert = j`` routes every token to adapter ``j`` with gate 1;
    ``record_routing = True`` keeps each sequence's router probabilities
    (``routing_probs``, ``(B, T)``; token level: the mean over the prompt's tokens).
    """

    config: MoAConfig

    def __init__(self, base_layer: nn.Linear, config: MoAConfig, scaling: float):
        super().__init__(base_layer, config, scaling)
        self.level = config.level
        self.prompt_mask: torch.Tensor | None = None
        self.task_labels: torch.Tensor | None = None
        self.force_expert: int | None = None
        self.record_routing = False
        self.routing_probs: torch.Tensor | None = None
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
        keep = labels >= 0
        if valid is not None:
            keep = keep & valid
        if keep.any():
            loss = F.cross_entropy(logits[keep].float(), labels[keep])
            self._aux = self.config.router_supervision * self.supervision_scale * loss

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
            xs = x.reshape(n_seq, length, self.in_features)
            if prompt is None:
                pooled, seq_valid = xs.mean(1), None
            else:
                weight = prompt.view(n_seq, length).to(x.dtype)
                pooled = (xs * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True).clamp_min(1)
                seq_valid = prompt.view(n_seq, length).any(1)
            logits = self.router(pooled)  # (B, T)
            index, weight = self._select(logits)
            load = selection_share(index, self.num_experts, seq_valid)
            if labels is not None:
                self._supervise(logits, labels, seq_valid)
            if self.record_routing:
                self.routing_probs = torch.softmax(logits.detach().float(), dim=-1)
            index = index.repeat_interleave(length, dim=0)
            weight = weight.repeat_interleave(length, dim=0)
            return Routing(index=index, weight=weight, load=load)
        logits = self.router(x)  # (N, T)
        index, weight = self._select(logits)
        load = selection_share(index, self.num_experts, token_mask)
        if labels is not None:
            self._supervise(logits, labels.repeat_interleave(length), token_mask)
        if self.record_routing:
            probs = torch.softmax(logits.detach().float(), dim=-1).view(n_seq, length, -1)
            w = (
                torch.ones(n_seq, length, device=x.device)
                if prompt is None
                else prompt.view(n_seq, length).float()
            )
            self.routing_probs = (probs * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True).clamp_min(1)
        return Routing(index=index, weight=weight, load=load)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", level={self.level}"


# -- stage one: the task adapters -------------------------------------------------------------


@dataclass
class TaskAdapter:
    """One stage-one job: a peft LoRA of ``rank`` trained on ``task``'s items only.

    ``effective`` (hashed into ``name``) holds only this adapter's own settings: the
    model, the data generation settings (not the task selection), the training
    settings, rank, alpha, task, seed and steps; never the list of other tasks.
    """

    name: str
    task: str
    rank: int
    alpha: float
    seed: int
    steps: int | None
    effective: dict[str, Any] = field(repr=False)

    @property
    def path(self) -> str:
        """The folder, relative to ``out_dir``."""
        return f"{TASK_ADAPTER_DIR}/{self.name}"

    def run(self):
        """The :class:`~harness.study.Run` that trains it (method ``lora``)."""
        from harness.study import Run

        return Run(
            self.name,
            "lora",
            f"r{self.rank}",
            1,
            self.seed,
            {"alpha": self.alpha, "rank": self.rank},
            self.effective,
        )


def task_adapter(study: dict[str, Any], task: str, rank: int, alpha: float, seed: int,
                 steps: int | None) -> TaskAdapter:
    from harness.study import _drop_unset, effective_common, short_hash

    common = effective_common(study)
    train = dict(common["train"])
    if steps is not None:
        train.pop("steps", None)  # replaced by this adapter's own step count
    effective = _drop_unset(
        {
            "model": common["model"],
            "data": {k: v for k, v in common["data"].items() if k != "tasks"},
            "train": train,
            "method": "lora",
            "stage": "moa task adapter",
            "task": task,
            "rank": rank,
            "alpha": alpha,
            "seed": seed,
            "steps": steps,
        }
    )
    name = f"{task}-r{rank}-s{seed}-{short_hash(effective)}"
    return TaskAdapter(name, task, rank, alpha, seed, steps, effective)


def study_tasks(study: dict[str, Any]) -> list[str]:
    """The tasks of the study's training data, in the data's order."""
    data = study["data"]
    if data.get("tasks"):
        return list(data["tasks"])
    if data["source"] == "generated":
        from harness.data.suite import TASKS

        return list(TASKS)
    if data["source"] != "jsonl":
        from harness.config import ConfigError

        raise ConfigError(
            f"moa needs the task list of data source {data['source']!r}: set data.tasks, or "
            "the method's `tasks` option"
        )
    train, test = Path(data["train"]), Path(data["test"])
    if not train.exists():
        from harness.data.jsonl import DataError

        raise DataError(f"{train}: file not found (data.train)")
    tasks: list[str] = []
    for line in train.read_text().splitlines():
        if line.strip():
            task = json.loads(line).get("task", test.stem)
            if task not in tasks:
                tasks.append(task)
    return tasks


# -- reading stage-one folders -----------------------------------------------------------------


class IncompatibleAdapters(ValueError):
    """Task-adapter folders that cannot be stacked into one MoA model; names folder and field."""


def read_task_adapter(folder: str | Path) -> dict[str, Any]:
    """What a task-adapter folder holds: ``task, rank, alpha, targets, model, data_dir,
    train, seed, steps`` (from its ``run.json`` and ``adapter/adapter.json``)."""
    from harness.io import read_json

    folder = Path(folder)
    for rel in ("run.json", "train.json", "adapter/adapter.json", "adapter/adapter.safetensors"):
        if not (folder / rel).exists():
            raise IncompatibleAdapters(
                f"{folder}: not a trained task adapter ({rel} is missing); train it with "
                "`python -m harness train-task-adapter` or let snakemake run train_task_adapter"
            )
    spec = read_json(folder / "run.json")
    adapter = read_json(folder / "adapter" / "adapter.json")
    effective = spec.get("effective_config") or {}
    if adapter.get("method") != "lora":
        raise IncompatibleAdapters(
            f"{folder}: field 'method' is {adapter.get('method')!r}; a task adapter is a peft "
            "LoRA ('lora')"
        )
    if not effective.get("task"):
        raise IncompatibleAdapters(
            f"{folder}: field 'task' is missing from run.json's effective_config; a task "
            "adapter is trained on one task's items"
        )
    return {
        "folder": folder,
        "task": effective["task"],
        "rank": adapter["config"]["rank"],
        "alpha": adapter["config"]["alpha"],
        "targets": list(adapter["targets"]),
        "model": effective.get("model"),
        "model_spec": spec["model"],
        "cache_dir": spec.get("cache_dir"),
        "data_dir": spec.get("data_dir"),
        "data": effective.get("data"),
        "train": effective.get("train"),
        "seed": spec.get("seed"),
        "steps": effective.get("steps"),
    }


def check_compatible(infos: list[dict[str, Any]]) -> None:
    """Refuse adapters that differ in base model, adapted modules, rank or alpha, or that
    share a task; the message names the folder and the field."""
    if not infos:
        raise IncompatibleAdapters("no task-adapter folders given")
    first = infos[0]
    for info in infos[1:]:
        for fld, what in (
            ("model", "base model spec"),
            ("targets", "adapted modules"),
            ("rank", "LoRA rank"),
            ("alpha", "LoRA alpha"),
        ):
            if info[fld] != first[fld]:
                raise IncompatibleAdapters(
                    f"{info['folder']}: field {fld!r} ({what}) is {_short(info[fld])}, but "
                    f"{first['folder']} has {_short(first[fld])}; every task adapter of a MoA "
                    "model needs the same base model, adapted modules, rank and alpha"
                )
    seen: dict[str, Path] = {}
    for info in infos:
        if info["task"] in seen:
            raise IncompatibleAdapters(
                f"{info['folder']}: field 'task' is {info['task']!r}, the same as "
                f"{seen[info['task']]}; give one adapter per task"
            )
        seen[info["task"]] = info["folder"]


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 120 else text[:117] + "..."


# -- the method ----------------------------------------------------------------------------------


@register
class MoA(BlockMixtureMethod):
    name = "moa"
    description = (
        "one peft LoRA per task trained separately (stage one), frozen and combined by a "
        "trained router (stage two)"
    )
    paper = "Feng et al. 2024, arXiv 2403.03432"
    config_cls = MoAConfig
    layer_cls = MoALayer
    sweeps_granularity = False
    needs_task_labels = True

    # -- planning ----------------------------------------------------------------------
    def study_options(self, study: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
        from harness.config import ConfigError

        opts = dict(options or {})
        available = study_tasks(study)
        tasks = opts.get("tasks")
        if tasks is None:
            tasks = available
        if isinstance(tasks, str) or not isinstance(tasks, list) or not tasks:
            raise ConfigError(f"moa option tasks = {tasks!r}; expected a non-empty list of task names")
        unknown = [t for t in tasks if t not in available]
        dup = sorted({t for t in tasks if tasks.count(t) > 1})
        if unknown or dup:
            raise ConfigError(
                f"moa option tasks = {tasks!r}: "
                + (f"{unknown} not in the training data" if unknown else f"{dup} listed twice")
                + f"; tasks of the training data: {available}"
            )
        opts["tasks"] = list(tasks)
        steps = study["train"].get("steps")
        if steps:
            if opts.get("task_steps") is None:
                opts["task_steps"] = math.ceil(steps / len(available))
            if opts.get("router_steps") is None:
                opts["router_steps"] = math.ceil(steps / len(tasks))
        return opts

    def variants(self, request) -> list[Variant]:
        raise BudgetError(
            "moa's variant (T task adapters) depends on the task list: plan it through "
            "harness.study.plan_study, or call plan_variants(request, {'tasks': [...]})"
        )

    def plan_variants(self, request, options) -> list[Variant]:
        tasks = (options or {}).get("tasks")
        if not tasks:
            return self.variants(request)
        return [Variant(len(tasks), f"T{len(tasks)}")]

    def solve(self, request, variant, shapes, options=None) -> MoAConfig:
        from harness.budget import _nearest

        options = dict(options or {})
        tasks = options.get("tasks")
        if not tasks:
            self.variants(request)  # raises with the explanation
        T, R, K = len(tasks), request.total_rank, request.active_rank
        if R % T:
            lower, upper = T * (R // T), T * (R // T + 1)
            near = [v for v in (lower, upper) if v >= T]
            divisors = [t for t in range(1, R + 1) if R % t == 0 and (K % (R // t) == 0)]
            raise BudgetError(
                f"moa trains one LoRA per task: per-task rank = total_rank/T = {R}/{T} = "
                f"{R / T:.3g} is not a whole number (T = {T} tasks: {', '.join(tasks)}); "
                f"feasible total ranks for T={T}: multiples of {T}; nearest: {near}; or give "
                f"the method's `tasks` option a number of tasks T in {divisors} "
                f"(feasible for R={R}, K={K})"
            )
        r = R // T
        if K % r:
            feasible = [r * j for j in range(1, T + 1)]
            raise BudgetError(
                f"moa with T={T} task adapters of rank r = R/T = {R}/{T} = {r}: top-k = "
                f"active_rank/r = {K}/{r} = {K / r:.3g}, not a whole number of adapters; "
                f"feasible active ranks for R={R}, T={T}: {feasible}; nearest: "
                f"{_nearest(feasible, K)}"
            )
        config = self.configure(
            options, alpha=request.alpha, num_experts=T, expert_rank=r, top_k=K // r
        )
        if config.top_k == 1 and config.router_supervision <= 0:
            raise BudgetError(
                f"moa with top-1 routing (K/r = {K}/{r}) needs router_supervision > 0 (got "
                f"{config.router_supervision}): the chosen adapter acts at full strength, so "
                "the task-label loss is the router's only training signal"
            )
        if request.router == "counted":
            config = self._fit_counted(config, request, shapes)
        return config

    def _fit_counted(self, config: MoAConfig, request, shapes) -> MoAConfig:
        """``router: counted``: the largest per-task rank (same T, same k) whose total,
        router included, is within ``tolerance`` of LoRA rank R's."""
        from harness.budget import _deviation, lora_count

        target = lora_count(request.total_rank, shapes)
        devs = []
        for rank in range(config.expert_rank, 0, -1):
            candidate = dataclasses.replace(config, expert_rank=rank)
            dev = _deviation(self.count_model(candidate, shapes).total, target)
            if abs(dev) <= request.tolerance:
                return candidate
            devs.append((abs(dev), rank))
        closest, rank = min(devs)
        raise BudgetError(
            f"moa with T={config.num_experts} task adapters: with router: counted no per-task "
            f"rank at most {config.expert_rank} puts the total (adapters + router) within "
            f"{request.tolerance:.1%} of LoRA rank {request.total_rank}'s {target:,} parameters "
            f"(closest: rank {rank}, {closest:.1%} off). Raise budget.tolerance to at least "
            f"{closest:.1%}, or use router: separate."
        )

    def describe(self, config: MoAConfig) -> dict[str, Any]:
        return {**super().describe(config), "level": config.level}

    def components(self, study, config: MoAConfig, seed: int) -> list[TaskAdapter]:
        return [
            task_adapter(study, task, config.expert_rank, config.alpha, seed, config.task_steps)
            for task in config.tasks or []
        ]

    # -- building and loading ----------------------------------------------------------
    def apply(self, model, targets, config: MoAConfig) -> None:
        super().apply(model, targets, config)
        for target in targets:
            model.get_submodule(target.name).supervision_scale = 1.0 / len(targets)

    def load_components(self, handle, paths: list[Any]) -> None:
        """Stack the stage-one LoRAs (one folder per task, in ``config.tasks`` order) into the
        rank blocks of every MoA layer and freeze them; only the routers stay trainable."""
        from safetensors.torch import load_file

        config: MoAConfig = handle.config
        tasks = list(config.tasks or [])
        if len(paths) != config.num_experts or len(tasks) != config.num_experts:
            raise IncompatibleAdapters(
                f"moa with {config.num_experts} experts got {len(paths)} task-adapter folders "
                f"for tasks {tasks}"
            )
        infos = [read_task_adapter(p) for p in paths]
        check_compatible(infos)
        targets = [t.name for t in handle.targets]
        r = config.expert_rank
        for e, (info, task) in enumerate(zip(infos, tasks)):
            for fld, want in (("task", task), ("rank", r), ("alpha", config.alpha), ("targets", targets)):
                if info[fld] != want:
                    raise IncompatibleAdapters(
                        f"{info['folder']}: field {fld!r} is {_short(info[fld])}, but this MoA "
                        f"model's adapter {e} needs {_short(want)}"
                    )
            state = load_file(str(Path(info["folder"]) / "adapter" / "adapter.safetensors"))
            with torch.no_grad():
                for name in targets:
                    layer = handle.model.get_submodule(name)
                    layer.lora_A[e * r : (e + 1) * r].copy_(state[f"{name}.lora_A.default.weight"])
                    layer.lora_B[:, e * r : (e + 1) * r].copy_(state[f"{name}.lora_B.default.weight"])
        frozen = []
        for name in targets:
            layer = handle.model.get_submodule(name)
            frozen += [layer.lora_A, layer.lora_B]
        handle.add_frozen(frozen)

    # -- training ----------------------------------------------------------------------
    def training_tasks(self, config: MoAConfig) -> list[str] | None:
        return list(config.tasks) if config.tasks else None

    def training_steps(self, config: MoAConfig, train, n_examples: int) -> int | None:
        if config.router_steps is not None:
            return config.router_steps
        from harness.train import total_steps

        return max(1, math.ceil(total_steps(train, n_examples) / config.num_experts))

    def learning_rate(self, config: MoAConfig, train) -> float | None:
        return config.router_lr

    def task_label_ids(self, config: MoAConfig, tasks: list[str]) -> torch.Tensor:
        order = {t: i for i, t in enumerate(config.tasks or [])}
        return torch.tensor([order.get(t, -1) for t in tasks], dtype=torch.long)

    # -- evaluation --------------------------------------------------------------------
    def evaluation_metrics(self, loaded, data_dir) -> dict[str, Any]:
        items = held_out_items(Path(data_dir))
        return router_accuracy(loaded, items)


def held_out_items(data_dir: Path) -> list[dict[str, Any]]:
    """The held-out test items the data step wrote (every task of the suite)."""
    from harness.io import read_json

    summary = read_json(data_dir / "data_summary.json")
    items = []
    for rel in summary["files"]["test"].values():
        for line in (data_dir / rel).read_text().splitlines():
            if line.strip():
                items.append(json.loads(line))
    return items


@torch.no_grad()
def routing_probabilities(loaded, prompts: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    """Router probabilities ``(n_layers, n_prompts, T)`` of every MoA layer for each prompt
    (token ids), read with the same forward as lm-eval's scoring (lower-layer cache when
    only the top layers are adapted)."""
    from harness.split import cached_lower, full_forward, pad_batch, upper_forward

    model, handle = loaded.model, loaded.handle
    layers = [m for m in model.modules() if isinstance(m, MoALayer)]
    device = next(model.parameters()).device
    unique = sorted({tuple(p) for p in prompts}, key=lambda s: (len(s), s))
    position = {s: i for i, s in enumerate(unique)}
    start = loaded.split_start
    pad_id = loaded.tokenizer.pad_token_id
    cache = None
    if start is not None:
        cache = cached_lower(
            model, loaded.fingerprint, unique, start, pad_id, loaded.cache_dir, desc="lower layers (eval)"
        )
    out = torch.zeros(len(layers), len(unique), layers[0].num_experts if layers else 0)
    for m in layers:
        m.record_routing = True
    try:
        for b in range(0, len(unique), batch_size):
            ids = list(range(b, min(b + batch_size, len(unique))))
            if cache is not None:
                inputs, mask = cache.batch(ids)
                with handle.token_mask(mask.to(device)):
                    upper_forward(model, inputs.to(device), mask.to(device), start)
            else:
                inputs, mask = pad_batch([unique[i] for i in ids], pad_id)
                with handle.token_mask(mask.to(device)):
                    full_forward(model, inputs.to(device), mask.to(device))
            for li, m in enumerate(layers):
                out[li, b : b + len(ids)] = m.routing_probs.cpu()
    finally:
        for m in layers:
            m.record_routing = False
            m.routing_probs = None
    return out[:, [position[tuple(p)] for p in prompts]]


def router_accuracy(loaded, items: list[dict[str, Any]], batch_size: int = 64) -> dict[str, Any]:
    """Share of (adapted module, test prompt) pairs whose top-1 task adapter is the item's
    task, i.e. each module's router accuracy averaged over the adapted modules; per task
    too. Items of tasks without an adapter are left out."""
    from harness.data.prompts import build_prompt, continuation
    from harness.tokenize import encode_pair

    tasks = list(loaded.handle.config.tasks or [])
    kept = [it for it in items if it.get("task") in tasks]
    if not kept:
        return {"router_accuracy": None, "router_accuracy_by_task": {}}
    # the context lm-eval scores the answer after (harness.tokenize.encode_pair)
    prompts = [
        encode_pair(loaded.tokenizer, build_prompt(it), continuation(it["choices"][it["label"]]))[0]
        for it in kept
    ]
    probs = routing_probabilities(loaded, prompts, batch_size)
    labels = torch.tensor([tasks.index(it["task"]) for it in kept])
    correct = (probs.argmax(-1) == labels.unsqueeze(0)).float()  # (layers, items)
    by_task = {
        t: round(float(correct[:, labels == i].mean()), 6)
        for i, t in enumerate(tasks)
        if bool((labels == i).any())
    }
    return {
        "router_accuracy": round(float(correct.mean()), 6),
        "router_accuracy_by_task": by_task,
    }
