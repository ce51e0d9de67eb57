"""Study configs: load YAML, validate against ``config_schema.yaml``, fill in defaults.

Every error names the file, the key path, the bad value and what would be valid,
and is raised before any job starts.
"""

from __future__ import annotations

import copy
import difflib
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

SCHEMA_PATH = Path(__file__).with_name("config_schema.yaml")


class ConfigError(ValueError):
    """An invalid study config; the message says where and what would be valid."""


@cache
def schema() -> dict[str, Any]:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _validator_with_defaults():
    from jsonschema import Draft202012Validator, validators

    def set_defaults(validator, properties, instance, schema_):
        if isinstance(instance, dict):
            for name, sub in properties.items():
                if "default" in sub and name not in instance:
                    instance[name] = copy.deepcopy(sub["default"])
        yield from Draft202012Validator.VALIDATORS["properties"](
            validator, properties, instance, schema_
        )

    return validators.extend(Draft202012Validator, {"properties": set_defaults})


def _key_path(error) -> str:
    parts = [str(p) if not isinstance(p, int) else f"[{p}]" for p in error.absolute_path]
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _describe(error, source: str) -> str:
    where = _key_path(error)
    sub = error.schema if isinstance(error.schema, dict) else {}
    value = error.instance
    if error.validator == "additionalProperties":
        allowed = sorted(sub.get("properties", {}))
        extra = sorted(set(value) - set(allowed)) if isinstance(value, dict) else []
        hints = [
            f"{key!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(key, allowed, n=1)) else repr(key)
            for key in extra
        ]
        return (
            f"{source}: unknown key(s) {', '.join(hints)} in {where}; "
            f"allowed keys: {', '.join(allowed)}"
        )
    if error.validator == "required":
        return f"{source}: {where}: {error.message}"
    if error.validator == "enum":
        return (
            f"{source}: {where} = {value!r} is not allowed; valid values: "
            f"{', '.join(map(str, sub['enum']))}"
        )
    if error.validator == "type":
        expected = sub.get("type")
        return (
            f"{source}: {where} = {value!r} has type {type(value).__name__}; expected {expected}"
        )
    if error.validator in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum"):
        bound = sub[error.validator]
        words = {
            "minimum": ">=",
            "exclusiveMinimum": ">",
            "maximum": "<=",
            "exclusiveMaximum": "<",
        }[error.validator]
        return f"{source}: {where} = {value!r} is out of range; valid: {words} {bound}"
    if error.validator == "oneOf" and "description" in sub:
        return f"{source}: {where} = {value!r} is not valid; expected {sub['description']}"
    return f"{source}: {where} = {value!r}: {error.message}"


def validate_config(raw: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Schema-check ``raw`` and return a copy with every default filled in."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level, got {type(raw).__name__}")
    config = copy.deepcopy(raw)
    validator = _validator_with_defaults()(schema())
    errors = sorted(validator.iter_errors(config), key=lambda e: (len(e.absolute_path), e.message))
    if errors:
        # the deepest error of a oneOf is usually the useful one
        error = errors[0]
        if error.context:
            # a branch that failed only on type is the wrong branch for this value
            candidates = [e for e in error.context if e.validator != "type"] or error.context
            error = max(candidates, key=lambda e: len(e.absolute_path))
        raise ConfigError(_describe(error, source))
    _check_semantics(config, source)
    return config


#: config values that become file or folder paths (Snakemake patterns, run folders, reads)
PATH_KEYS = (
    ("out_dir",),
    ("cache_dir",),
    ("model", "source"),
    ("model", "config_json"),
    ("data", "train"),
    ("data", "test"),
    ("data", "include_path"),
    ("eval", "include_path"),
    ("eval", "general_text"),
)

#: a plugin: a dotted module path, optionally ``:Class`` (what ``importlib`` imports absolutely)
PLUGIN_PATH = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*(:[A-Za-z_]\w*)?$")


def path_value_problem(value: str) -> str | None:
    """Why ``value`` cannot be used in a path the workflow builds (``None``: it can): empty,
    a brace (Snakemake reads ``{...}`` in a path as a wildcard), a newline or another
    control character (shell quoting and log lines break; no file system needs them)."""
    if not value.strip():
        return "is empty" if not value else "is only whitespace"
    braces = sorted({c for c in value if c in "{}"})
    if braces:
        return (f"contains {' and '.join(map(repr, braces))}: Snakemake reads braces in a path as a "
                "wildcard, so the study's files could not be named")
    control = next((c for c in value if ord(c) < 32 or ord(c) == 127), None)
    if control is not None:
        name = {"\n": "a newline", "\r": "a carriage return", "\t": "a tab"}.get(control, f"control character {control!r}")
        return f"contains {name} at position {value.index(control)}"
    return None


def _check_path_values(config: dict[str, Any], source: str) -> None:
    """Every config value that becomes a path can be one; every plugin is an import path."""
    for keys in PATH_KEYS:
        value: Any = config
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if isinstance(value, str):
            problem = path_value_problem(value)
            if problem:
                raise ConfigError(
                    f"{source}: {'.'.join(keys)} = {value!r} {problem}; give a non-empty path "
                    "without braces or control characters (e.g. results/my_study)"
                )
    for i, plugin in enumerate(config.get("plugins") or []):
        if not PLUGIN_PATH.match(plugin):
            why = (
                "a file path or a relative import, which could reach outside the folders Python "
                "imports plugins from (the study's folder, PYTHONPATH, installed packages)"
                if "/" in plugin or "\\" in plugin or plugin.startswith(".") or ".." in plugin
                else "not a dotted module path"
            )
            raise ConfigError(
                f"{source}: plugins[{i}] = {plugin!r} is {why}; give the module's import path, "
                "e.g. my_lab.frozen_router or my_lab.frozen_router:FrozenRouter, with the "
                "module in the study's folder or an installed package"
            )


def _check_semantics(config: dict[str, Any], source: str) -> None:
    _check_path_values(config, source)
    data = config["data"]
    if data["source"] in ("jsonl", "files"):
        for key in ("train", "test"):
            if key not in data:
                raise ConfigError(f"{source}: data.source is {data['source']}, so data.{key} (a file path) is required")
    if data["source"] == "hub" and not data.get("dataset"):
        raise ConfigError(f"{source}: data.source is hub, so data.dataset (a datasets.load_dataset name) is required")
    if data["source"] == "lm_eval" and not data.get("tasks"):
        raise ConfigError(
            f"{source}: data.source is lm_eval, so data.tasks (lm-eval task names with a train "
            "split, e.g. [boolq, piqa, arc_easy]) is required"
        )
    if data["source"] == "lm_eval" and not config["eval"].get("tasks"):
        raise ConfigError(
            f"{source}: data.source is lm_eval, which writes no suite task folder, so eval.tasks "
            "(the lm-eval tasks to score, e.g. the same names as data.tasks) is required"
        )
    if data["source"] == "generated" and data.get("train_per_task") is None:
        raise ConfigError(
            f"{source}: data.train_per_task = null is only valid for data.source lm_eval "
            "(no cap); the generated suite needs a number of items per task (>= 4)"
        )
    budget = config["budget"]
    if budget["active_rank"] > budget["total_rank"]:
        raise ConfigError(
            f"{source}: budget.active_rank = {budget['active_rank']} exceeds budget.total_rank = "
            f"{budget['total_rank']}; valid: 1 <= active_rank <= total_rank"
        )
    train = config["train"]
    if train.get("steps") is None and train.get("epochs") is None:
        raise ConfigError(f"{source}: set train.steps or train.epochs")
    tune = config.get("tune")
    if tune:
        shared = sorted(set(tune["seeds"]) & set(train["seeds"]))
        if shared:
            raise ConfigError(
                f"{source}: tune.seeds {shared} are also train.seeds: the tuning runs' seeds must be "
                "kept apart from the reported ones (e.g. tune.seeds: [1000])"
            )
        if data["source"] == "lm_eval":
            raise ConfigError(f"{source}: tune needs training items known before the data step (data.source jsonl or generated)")
    names = [m if isinstance(m, str) else m["name"] for m in config["methods"]]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"{source}: methods lists {dup} more than once")


def load_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        folder = path.parent if path.parent.is_dir() else Path("config")
        found = sorted(p.name for p in folder.glob("*.yaml") if p.name != SCHEMA_PATH.name) if folder.is_dir() else []
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise ConfigError(
            f"config file {str(path)!r} {what} (working directory {Path.cwd()}); configs in "
            f"{folder}/: {', '.join(found) or 'none'}"
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return validate_config(raw or {}, source=str(path))


def method_entries(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """``[(name, options), ...]`` in config order."""
    out = []
    for entry in config["methods"]:
        if isinstance(entry, str):
            out.append((entry, {}))
        else:
            out.append((entry["name"], dict(entry.get("options") or {})))
    return out
