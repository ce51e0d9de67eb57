"""From a validated config to the list of runs: budget rows x seeds, each with its folder name.

A run's folder name carries the method, its variant (granularity ``G8``, or
``r16`` for a LoRA reference of rank 16), the seed and a short hash of the
run's *effective* config (everything that can change its numbers), so a changed
setting never lands in an old folder.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import yaml

from harness.adapters import Component, PlanContext, TargetShape, get_method, load_plugin
from harness.adapters.registry import BUILTIN_PACKAGE
from harness.common.metrics import register_method_metrics
from harness.data.tasks import content_digest, task_digests, training_items, training_task_names
from harness.data.validation import validation_split
from harness.model.load import DEFAULT_TINY_ARCHITECTURE
from harness.model.shapes import study_shapes
from harness.plan.budget import BudgetRequest, BudgetRow, solve_study
from harness.plan.config import load_config, method_entries

#: settings that change where or how fast things run, not what is computed (device and
#: thread count can still move the last bits of floating-point results)
_EXECUTION_ONLY = {
    "model": ("config_json", "device", "lower_layer_cache"),
    "train": ("seeds", "checkpoint_every", "threads", "processes"),
    # general_text adds a score and changes no training: results without it are stale (its
    # content is part of the test-data digest), not renamed
    "eval": ("include_base", "batch_size", "general_text"),
    # a declaration for the hygiene check: the items read are the same
    "data": ("allow_overlap",),
}

def short_hash(obj: Any, n: int = 8) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


RUNS_DIR = "runs"
TUNING_DIR = "tuning"


@dataclass(frozen=True)
class RunSettings:
    """A run's training settings, fixed once when it is planned and read from here by
    training and evaluation: optimizer ``steps`` and ``warmup_steps``, peak learning rate
    ``lr``, the ``tasks`` whose items it trains on (``None``: all) and how many items that
    is (``examples``). ``steps``, ``warmup_steps`` and ``examples`` are ``None`` only for a
    study that counts in epochs over lm-eval's train splits, whose size is known after the
    data step: training resolves them then, with this module's same rule
    (:func:`resolve_settings`)."""

    steps: int | None
    warmup_steps: int | None
    lr: float | None  # None: a tuned run before the tune stage chose its rate
    tasks: tuple[str, ...] | None
    examples: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "lr": self.lr,
            "tasks": list(self.tasks) if self.tasks is not None else None,
            "examples": self.examples,
        }


def total_steps(train_cfg: dict[str, Any], n_examples: int | None) -> int | None:
    """``train.steps``, or ``ceil(epochs * (n_examples // batch_size))`` (at least 1);
    ``None`` when counted in epochs and the number of examples is not known yet."""
    if train_cfg.get("steps"):
        return int(train_cfg["steps"])
    if n_examples is None:
        return None
    per_epoch = n_examples // train_cfg["batch_size"]
    return max(1, math.ceil(train_cfg["epochs"] * per_epoch))


def warmup_steps(train_cfg: dict[str, Any], n_steps: int) -> int:
    """Warm-up steps of a run of ``n_steps``: ``ceil(warmup_ratio * n_steps)`` when
    ``train.warmup_ratio`` is set, else ``train.warmup_steps``; never more than ``n_steps``."""
    ratio = train_cfg.get("warmup_ratio")
    configured = train_cfg.get("steps")
    if ratio is None and configured and n_steps < configured:
        # a stage shorter than the study's runs (MoA) keeps the schedule's shape
        ratio = train_cfg["warmup_steps"] / configured
    steps = math.ceil(ratio * n_steps) if ratio is not None else train_cfg["warmup_steps"]
    return min(int(steps), n_steps)


def resolve_settings(
    train_cfg: dict[str, Any],
    method,
    method_config,
    tasks: list[str] | tuple[str, ...] | None,
    steps: int | None,
    task_counts: dict[str, int] | None,
    lr: float | None = None,
) -> RunSettings:
    """The one rule for a run's settings: its training tasks (a component's own, else the
    method's ``training_tasks``), the number of their items, its steps (a component's own,
    else the method's ``training_steps`` from the study's), warm-up, and its peak rate
    (``lr``: a tuned rate; else the method's ``learning_rate``, else ``train.lr``)."""
    if tasks is None:
        tasks = method.training_tasks(method_config)
    examples = None
    if task_counts is not None:
        examples = sum(task_counts.values()) if tasks is None else sum(task_counts.get(t, 0) for t in tasks)
    if steps is None:
        default = total_steps(train_cfg, examples)
        if default is not None:
            steps = method.training_steps(method_config, default) or default
    if lr is None:
        lr = method.learning_rate(method_config, train_cfg["lr"]) or train_cfg["lr"]
    return RunSettings(
        steps=steps,
        warmup_steps=warmup_steps(train_cfg, steps) if steps else None,
        lr=float(lr),
        tasks=tuple(tasks) if tasks is not None else None,
        examples=examples,
    )


def _code_digest(files: list[Path]) -> str:
    """A digest of Python source that ignores what cannot change a number: comments,
    docstrings and formatting (the syntax tree without docstrings)."""
    h = hashlib.sha256()
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                    and body and isinstance(body[0], ast.Expr)
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(path.name.encode())
        h.update(ast.dump(tree, annotate_fields=False).encode())
    return h.hexdigest()[:16]


def method_source(method) -> dict[str, Any]:
    """Where a method's code lives and a digest of it: every module that defines a class of
    the method, its layer or its config (outside the harness and the libraries; a package's
    ``__init__`` brings its sibling modules). ``builtin``: all of it is in the built-in
    ``methods/`` package (recorded, changes nothing: built-in or plugin, one rule). Training
    records it (``train.json``); a run whose method digest changed since is stale and
    retrained (:func:`harness.plan.status.invalid_files`). A plugin subclassing a built-in
    brings the built-in's file too, so an edit there retrains both."""
    classes = [type(method)]
    for attr in ("layer_cls", "config_cls"):
        if getattr(method, attr, None) is not None:
            classes.append(getattr(method, attr))
    files: set[Path] = set()
    for cls in classes:
        for klass in inspect.getmro(cls):
            module = klass.__module__
            if module.split(".")[0] in ("harness", "builtins", "abc", "typing", "torch", "peft"):
                continue
            try:
                path = Path(inspect.getsourcefile(klass)).resolve()
            except TypeError:
                continue
            files.update(sorted(path.parent.glob("*.py")) if path.name == "__init__.py" else [path])
    ordered = sorted(files)
    builtin_root = Path(__file__).resolve().parents[2] / BUILTIN_PACKAGE
    return {
        "files": [_shown(p) for p in ordered],
        "digest": _code_digest(ordered) if ordered else None,
        "builtin": bool(ordered) and all(builtin_root in p.parents for p in ordered),
    }


_HARNESS = Path(__file__).resolve().parents[1]

#: the toolkit every method is built from: a change here makes every run trained with the
#: old code stale (:func:`harness.plan.status.invalid_files`)
TOOLKIT_PACKAGE = "adapters"

#: the engine modules that shape a run's numbers: the training loop and example building,
#: scoring and its per-item values, every module of ``harness/model/`` (loading, dtype,
#: lower-layer cache, the lm-eval model, a run folder's rebuild), prompts and the lm-eval
#: task files. A change here is recorded and flagged (``status``, the provenance table),
#: not redone.
ENGINE_MODULES = (
    "run/train.py",
    "run/evaluate.py",
    *sorted(p.relative_to(_HARNESS).as_posix() for p in (_HARNESS / "model").glob("*.py") if p.name != "__init__.py"),
    "data/prompts.py",
    "data/generation.py",
    "data/lm_eval_tasks.py",
    "common/metrics.py",
)


@lru_cache(maxsize=1)
def code_identity() -> dict[str, Any]:
    """The digests (:func:`_code_digest`: comments, docstrings and formatting ignored) of the
    code that produces a run's numbers besides its method: ``toolkit`` (every module of
    ``harness.adapters``) and ``engine`` (:data:`ENGINE_MODULES`, one digest each and one
    over all). Training records it in ``train.json`` (``code``); computed once a process."""
    toolkit = sorted((_HARNESS / TOOLKIT_PACKAGE).glob("*.py"))
    engine = [_HARNESS / rel for rel in ENGINE_MODULES if (_HARNESS / rel).is_file()]
    return {
        "toolkit": {"package": f"harness.{TOOLKIT_PACKAGE}", "digest": _code_digest(toolkit)},
        "engine": {
            "digest": _code_digest(engine),
            "files": {f"harness/{p.relative_to(_HARNESS).as_posix()}": _code_digest([p]) for p in engine},
        },
    }


#: code changes declared not to change any number a run records (see the file's header)
NUMBER_PRESERVING = _HARNESS.parent / "number_preserving.yaml"


def declared_equivalent(kind: str, name: str | None = None) -> dict[str, Any] | None:
    """The declaration in :data:`NUMBER_PRESERVING` that runs recorded under older code of
    ``kind`` (``method`` with its ``name``, ``toolkit`` or ``engine``) count as trained by
    today's: ``{"to": current digest, "from": [older digests], "why": ...}``, or ``None``.
    A declaration whose ``to`` is not today's digest has lapsed (the code changed again) and
    is ignored by the caller; a malformed file is an error naming it."""
    if not NUMBER_PRESERVING.exists():
        return None
    data = yaml.safe_load(NUMBER_PRESERVING.read_text()) or {}
    entry = data.get(kind) or {}
    if name is not None:
        entry = entry.get(name) or {}
    if not entry:
        return None
    if not isinstance(entry.get("to"), str) or not isinstance(entry.get("from"), list) or not entry.get("why"):
        raise ValueError(f"{NUMBER_PRESERVING}: {kind}{' ' + name if name else ''} needs 'to' (a digest), "
                         f"'from' (a list of digests) and 'why' (what shows the numbers are the same)")
    return entry


def _shown(path: Path) -> str:
    """A method file as its import root sees it (``methods/sira.py``, ``examples/x.py``)."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd().resolve()):
        try:
            return str(path.relative_to(root))
        except ValueError:
            continue
    return str(path)


@dataclass
class Run:
    """One training job: a run of the study (``runs/<run id>``, evaluated) or a component a
    staged run is built on (``<group>/<name>``, e.g. ``task_adapters/first-r4-s0-59304226``).

    ``components``: folders (relative to ``out_dir``) of the parts this run loads, in the
    method's order; ``tasks``/``steps``: a component's own training items and step count
    (``None``: the method's choice, else the study's).
    """

    run_id: str
    method: str
    tag: str
    granularity: int
    seed: int
    method_config: dict[str, Any]
    effective: dict[str, Any]
    row: BudgetRow | None = None
    components: list[str] = field(default_factory=list)
    tasks: list[str] | None = None
    steps: int | None = None
    group: str = RUNS_DIR
    #: the run's training settings, fixed by the plan (:class:`RunSettings`)
    settings: RunSettings | None = None
    #: where its method's code lives and its digest (:func:`method_source`)
    method_source: dict[str, Any] | None = None
    #: the data it trains and is scored on: ``main`` (the study's), or ``tune`` (the training
    #: items minus the validation split; scored on the validation split)
    split: str = "main"
    #: a final run whose learning rate the tune stage chooses (``StudyPlan.tuning``)
    tuned: bool = False

    @property
    def is_base(self) -> bool:
        return self.method == "base"

    @property
    def is_tuning(self) -> bool:
        """A tune-stage run (trained without the validation split, scored on it)."""
        return self.split == "tune"

    @property
    def is_component(self) -> bool:
        return self.group != RUNS_DIR and not self.is_tuning

    @property
    def path(self) -> str:
        """The run's folder, relative to ``out_dir``."""
        return f"{self.group}/{self.run_id}"


@dataclass
class StudyPlan:
    config: dict[str, Any]
    shapes: list[TargetShape]
    rows: list[BudgetRow]
    runs: list[Run] = field(default_factory=list)
    #: parts trained by their own jobs before the runs that load them, each once
    components: list[Run] = field(default_factory=list)
    #: the tune stage's runs: each tuned method x variant at every rate of the grid
    tuning: list[Run] = field(default_factory=list)

    @cached_property
    def by_id(self) -> dict[str, Run]:
        return {r.run_id: r for r in [*self.runs, *self.components, *self.tuning]}

    def run(self, run_id: str) -> Run:
        """A run or component of the plan by id (folder name); a near miss is named."""
        try:
            return self.by_id[run_id]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(run_id, list(self.by_id), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise KeyError(
                f"run {run_id!r} is not part of study {self.config['study']!r} as configured"
                f"{hint} List them with `python -m harness plan --config <config>`"
                + (" (--components for the components)" if self.components else "")
            ) from None

    @property
    def out_dir(self) -> Path:
        return Path(self.config["out_dir"])

    def run_dir(self, run: Run | str) -> Path:
        run = self.run(run) if isinstance(run, str) else run
        return self.out_dir / run.path

    @property
    def trained_runs(self) -> list[Run]:
        return [r for r in self.runs if not r.is_base]

    @property
    def training_jobs(self) -> list[Run]:
        """Everything that trains: the components first, the tuning runs, then the trained runs."""
        return [*self.components, *self.tuning, *self.trained_runs]

    @property
    def rates_path(self) -> Path:
        """The tune stage's choice of each tuned method x variant's learning rate."""
        return self.out_dir / TUNING_DIR / "rates.json"


def _strip(section: dict[str, Any], name: str) -> dict[str, Any]:
    out = copy.deepcopy(section)
    for key in _EXECUTION_ONLY.get(name, ()):
        out.pop(key, None)
    tiny = out.get("tiny") if name == "model" else None
    if isinstance(tiny, dict) and tiny.get("architecture") == DEFAULT_TINY_ARCHITECTURE:
        del tiny["architecture"]  # the default said aloud: the run ids of before the key existed
    return out


def _drop_unset(value: Any) -> Any:
    """Leave out settings that are ``None`` (unset), so that adding a new optional setting
    to the schema does not rename every existing run folder."""
    if isinstance(value, dict):
        return {k: _drop_unset(v) for k, v in value.items() if v is not None}
    return value


def effective_common(config: dict[str, Any]) -> dict[str, Any]:
    return _drop_unset(
        {
            "model": _strip(config["model"], "model"),
            "data": _strip(config["data"], "data"),
            "train": _strip(config["train"], "train"),
            "eval": _strip(config["eval"], "eval"),
        }
    )


# -- the plan ------------------------------------------------------------------------------


def plan_context(config: dict[str, Any]) -> PlanContext:
    """What a method may know when its options are completed: the training data's task
    names and the configured step count."""

    return PlanContext(tasks=training_task_names(config["data"]) or None, steps=config["train"].get("steps"))


def load_methods(config: dict[str, Any]):
    """``[(method, options), ...]`` in config order: plugins loaded, options completed."""
    for path in config.get("plugins", []):
        load_plugin(path)
    context = plan_context(config)
    out = []
    for name, options in method_entries(config):
        method = get_method(name)
        register_method_metrics(method.metrics)
        out.append((method, method.prepare_options(options, context)))
    return out


def component_run(
    config: dict[str, Any], component: Component, seed: int, digests: dict[str, str] | None = None
) -> Run:
    """The job that trains ``component`` for ``seed``: its folder name hashes the base model,
    the data settings (not the task selection) and the content of the training items it
    reads (its own tasks' only), the training settings (not the step count when the
    component sets its own), its method, identity, seed and steps."""
    common = effective_common(config)
    train = dict(common["train"])
    if component.steps is not None:
        train.pop("steps", None)  # replaced by the component's own step count
    data = {k: v for k, v in common["data"].items() if k != "tasks"}
    if digests is not None:
        data["train_content"] = content_digest(digests, component.tasks)
    effective = _drop_unset(
        {
            "model": common["model"],
            "data": data,
            "train": train,
            "method": component.method,
            **component.identity,
            "seed": seed,
            "steps": component.steps,
        }
    )
    name = f"{component.stem}-s{seed}-{short_hash(effective)}"
    return Run(
        name,
        component.method,
        component.tag,
        1,
        seed,
        dict(component.config),
        effective,
        tasks=list(component.tasks) if component.tasks is not None else None,
        steps=component.steps,
        group=component.group,
    )


def training_counts(config: dict[str, Any]) -> dict[str, int] | None:
    """Training items per task (``None`` for lm-eval sources, read by the data step)."""
    if config["data"]["source"] == "lm_eval":
        return None
    counts: dict[str, int] = {}
    for _, item in training_items(config["data"]):
        counts[item["task"]] = counts.get(item["task"], 0) + 1
    return counts


def training_digests(config: dict[str, Any]) -> dict[str, str] | None:
    """Per task, a digest of its training items (``None`` for lm-eval sources, whose items
    are known only after the data step: their config is hashed instead)."""
    if config["data"]["source"] == "lm_eval":
        return None
    return task_digests(training_items(config["data"]))


def row_key(method: str, tag: str) -> str:
    """How the tune stage names a method x variant (``sira-G24``)."""
    return f"{method}-{tag}"


def tuned_methods(config: dict[str, Any]) -> set[str] | None:
    """The methods the tune stage tunes (``None``: no tune stage): ``tune.methods``, or every
    method of the study that is not built on components (their parts would have trained on
    the validation items)."""
    tune = config.get("tune")
    if not tune:
        return None
    if tune.get("methods"):
        return set(tune["methods"])
    return {name for name, _ in method_entries(config)}


def tune_spec(config: dict[str, Any]) -> dict[str, Any]:
    """What a tuned run's id hashes of the tune stage: everything its chosen rate depends on."""
    tune = config["tune"]
    return {k: tune[k] for k in ("lrs", "validation_fraction", "seed", "seeds", "rule")}


def read_rates(config: dict[str, Any]) -> dict[str, float]:
    """The learning rates the tune stage chose (``{row key: rate}``; empty before it ran)."""
    path = Path(config["out_dir"]) / TUNING_DIR / "rates.json"
    if not path.exists():
        return {}
    return {key: float(entry["lr"]) for key, entry in json.loads(path.read_text())["rates"].items()}


def tuned_rate(config: dict[str, Any], run) -> float:
    """A tuned run's learning rate, from the tune stage's choice (its job waits for it)."""
    key = row_key(run.method, run.tag)
    rates = read_rates(config)
    if key not in rates:
        raise FileNotFoundError(
            f"{Path(config['out_dir']) / TUNING_DIR / 'rates.json'} has no rate for {key}: run the "
            "tune stage first (snakemake runs it; `python -m harness tune --config <config>` chooses)"
        )
    return rates[key]


def _plan_tuning(config, plan, common, digests, counts, rows_tuned) -> None:
    """The tune stage's runs: each tuned row at every rate of the grid and every tuning seed,
    trained on the training items minus the validation split and scored on that split."""
    tune = config["tune"]
    items = [item for _, item in training_items(config["data"])]
    tune_train, valid = validation_split(items, tune["validation_fraction"], tune["seed"])
    tune_digests = task_digests([(None, it) for it in tune_train])
    data = {**common["data"], "train_content": content_digest(tune_digests),
            "validation_content": content_digest(task_digests([(None, it) for it in valid])),
            "validation_fraction": tune["validation_fraction"], "validation_seed": tune["seed"]}
    tune_counts: dict[str, int] = {}
    for item in tune_train:
        tune_counts[item["task"]] = tune_counts.get(item["task"], 0) + 1
    for row in rows_tuned:
        method = get_method(row.method)
        config_obj = method.make_config(**row.config.to_dict())
        for lr in tune["lrs"]:
            for seed in tune["seeds"]:
                effective = {**common, "data": data, "method": row.method, "variant": row.variant.tag,
                             "method_config": row.config.to_dict(), "seed": seed, "tune_lr": lr}
                run_id = f"{row.method}-{row.variant.tag}-lr{lr:g}-s{seed}-{short_hash(effective)}"
                run = Run(run_id, row.method, row.variant.tag, row.variant.granularity, seed,
                          row.config.to_dict(), effective, row, group=f"{TUNING_DIR}/runs", split="tune")
                run.settings = resolve_settings(config["train"], method, config_obj, None, None, tune_counts, lr)
                plan.tuning.append(run)


def plan_study(config: dict[str, Any], shapes: list[TargetShape] | None = None) -> StudyPlan:
    """Solve the budget and expand seeds; infeasible budgets and unknown methods fail here."""
    methods = load_methods(config)
    shapes = shapes if shapes is not None else study_shapes(config)
    request = BudgetRequest.from_config(config["budget"])
    rows = solve_study(request, methods, shapes)
    plan = StudyPlan(config=config, shapes=shapes, rows=rows)
    digests = training_digests(config)
    common = effective_common(config)
    if digests is not None:  # what the runs read, not only where it comes from
        common["data"] = {**common["data"], "train_content": content_digest(digests)}
    known: set[str] = set()
    tuned = tuned_methods(config)
    rows_tuned = [
        row for row in rows
        if tuned is not None and row.method in tuned and not get_method(row.method).components(row.config, 0)
    ]
    tuned_ids = {id(row) for row in rows_tuned}
    for row in rows:
        for seed in config["train"]["seeds"]:
            effective = {
                **common,
                "method": row.method,
                "variant": row.variant.tag,
                "method_config": row.config.to_dict(),
                "seed": seed,
            }
            if id(row) in tuned_ids:  # its rate is the tune stage's choice: all it depends on
                effective["tune"] = tune_spec(config)
            parts = [
                component_run(config, c, seed, digests)
                for c in get_method(row.method).components(row.config, seed)
            ]
            if parts:
                effective["components"] = [p.path for p in parts]
                plan.components += [p for p in parts if p.path not in known]
                known.update(p.path for p in parts)
            run_id = f"{row.method}-{row.variant.tag}-s{seed}-{short_hash(effective)}"
            plan.runs.append(
                Run(run_id, row.method, row.variant.tag, row.variant.granularity, seed,
                    row.config.to_dict(), effective, row, [p.path for p in parts],
                    tuned=id(row) in tuned_ids)
            )
    counts = training_counts(config)
    rates = read_rates(config) if rows_tuned else {}
    sources: dict[str, dict[str, Any]] = {}
    for run in [*plan.components, *plan.runs]:
        method = get_method(run.method)
        lr = rates.get(row_key(run.method, run.tag)) if run.tuned else None
        run.settings = resolve_settings(
            config["train"], method, method.make_config(**run.method_config), run.tasks, run.steps, counts, lr
        )
        if run.tuned and lr is None:  # chosen by the tune stage before this run trains
            run.settings = dataclasses.replace(run.settings, lr=None)
        run.method_source = sources.setdefault(run.method, method_source(method))
    if rows_tuned:
        _plan_tuning(config, plan, common, digests, counts, rows_tuned)
        for run in plan.tuning:
            run.method_source = sources.setdefault(run.method, method_source(get_method(run.method)))
    if config["eval"]["include_base"]:
        effective = {"model": common["model"], "data": common["data"], "eval": common["eval"],
                     "method": "base"}
        run_id = f"base-G0-s0-{short_hash(effective)}"
        plan.runs.append(Run(run_id, "base", "G0", 0, 0, {}, effective))
    return plan


def plan_from_file(config_path: str | Path) -> tuple[dict[str, Any], StudyPlan]:
    """``(validated config, plan)`` of a study config file."""
    config = load_config(config_path)
    return config, plan_study(config)
