"""The benchmark's settings: the ``bench:`` section of a study config plus command-line overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from harness.adapters import BlockMixtureMethod, Method, get_method
from harness.plan.config import ConfigError
from harness.plan.study import load_methods


def has_sparse_path(method: Method, options: dict[str, Any]) -> bool:
    """Whether ``method`` (with its study options) routes top-k over rank blocks at every
    granularity, so its dense and sparse execution paths can be compared."""
    return (
        isinstance(method, BlockMixtureMethod)
        and method.routed
        and method.sweeps_granularity
        and method.uses_top_k(options or {})
    )


@dataclass
class BenchOptions:
    """The ``bench:`` section of a study config (``harness/plan/config_schema.yaml``, same defaults)."""

    warmup_steps: int = 3
    timed_steps: int = 10
    repeats: int = 3
    batch_size: int | None = None
    seq_len: int | None = None
    threads: int = 2
    sweep_steps: int = 4
    sweep_repeats: int = 2
    crossover_experts: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    #: routed method of the dense-vs-sparse sweep; ``None``: the study's first method with
    #: a top-k block-gated router and a granularity sweep
    crossover_method: str | None = None
    eval_batches: int = 3
    crossover: bool = True
    scaling: bool = True
    eval_cache: bool = True

    @classmethod
    def from_config(cls, config: dict[str, Any], **overrides: Any) -> BenchOptions:
        """``bench:`` of a (validated) study config, then command-line ``overrides`` (None: unset);
        every value is checked (:meth:`check`), so a bad one stops before the model loads."""
        values = dict(config.get("bench") or {})  # unset keys: the defaults below (= the schema's)
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise _bench_error(f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: "
                               f"{', '.join(sorted(known))}")
        options = cls(**values)
        options.check(config)
        return options

    def check(self, config: dict[str, Any] | None = None) -> None:
        """Refuse values the benchmark cannot run with; the message names the key and what is valid.

        With the study ``config``: ``crossover_method`` must be a registered routed method
        with a top-k router (the sparse path gathers the selected blocks), and at least one
        of ``crossover_experts`` must exceed the active rank K (top-k is K there)."""
        minimum = {
            "warmup_steps": 0, "timed_steps": 1, "repeats": 1, "threads": 1, "sweep_steps": 1,
            "sweep_repeats": 1, "eval_batches": 1, "batch_size": 1, "seq_len": 4,
        }
        for key, low in minimum.items():
            value = getattr(self, key)
            if value is None and key in ("batch_size", "seq_len"):
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise _bench_error(f"{key} = {value!r} is not valid; expected an integer >= {low}")
        for key in ("crossover", "scaling", "eval_cache"):
            if not isinstance(getattr(self, key), bool):
                raise _bench_error(f"{key} = {getattr(self, key)!r} is not valid; expected true or false")
        if self.crossover_method is not None and not isinstance(self.crossover_method, str):
            raise _bench_error(f"crossover_method = {self.crossover_method!r} is not valid; expected a "
                               "method name")
        experts = self.crossover_experts
        if (not isinstance(experts, (list, tuple)) or not experts
                or not all(isinstance(e, int) and not isinstance(e, bool) and e >= 2 for e in experts)):
            raise _bench_error(f"crossover_experts = {experts!r} is not valid; expected a non-empty "
                               "list of integers >= 2 (expert counts of rank-1 experts)")
        if config is None or not self.crossover:
            return
        methods = load_methods(config)  # loads the config's plugins
        options = {m.name: opts for m, opts in methods}
        if self.crossover_method is None:
            candidates = [m.name for m, opts in methods if has_sparse_path(m, opts)]
            if not candidates:
                raise _bench_error(
                    "crossover: no method of the study has a top-k block-gated router with a "
                    "granularity sweep, so there is no sparse path to compare; set "
                    "bench.crossover: false, or bench.crossover_method to such a method")
            self.crossover_method = candidates[0]
        try:
            method = get_method(self.crossover_method)
        except Exception as exc:  # the registry's message lists the registered methods
            raise _bench_error(f"crossover_method = {self.crossover_method!r}: {exc}") from None
        K = config["budget"]["active_rank"]
        if not has_sparse_path(method, options.get(method.name, {})):
            usable = [m.name for m, opts in methods if has_sparse_path(m, opts)]
            raise _bench_error(
                f"crossover_method = {self.crossover_method!r} has no top-k block-gated router with a "
                "granularity sweep, so it has no sparse path to compare; methods of this study that "
                f"have one: {', '.join(usable) or 'none'}")
        if not any(e > K for e in experts):
            raise _bench_error(
                f"crossover_experts = {list(experts)}: every count is <= the active rank K = {K} "
                f"(top-k is K in the sweep, so E must exceed it); give counts above {K}")


def _bench_error(message: str) -> Exception:
    return ConfigError(f"bench.{message}")
