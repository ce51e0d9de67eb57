"""Trained models out of the harness: ``python -m harness export RUN_DIR --out DIR [--merge]``
and :func:`load_exported`.

A run folder keeps its adapter in the harness's own layout (``adapter/adapter.safetensors``
and ``run.json``). :func:`export_run` writes it in a form usable without the study:

* **peft** (a method that is peft's own tuner, ``Method.export_peft``: LoRA): a standard peft adapter folder
  (``adapter_config.json`` + ``adapter_model.safetensors``) that
  ``PeftModel.from_pretrained(base, DIR)`` loads;
* **mixture** (every other method, built-in or plugin): ``adapter.safetensors`` (every
  adapter weight and buffer, the frozen parts a staged method was built on included) and
  ``export.json`` (method, its config, the adapted modules and their shapes, the base
  model). :func:`load_exported` puts the method's layers into the base model and returns
  a plain transformers model (``.generate()`` works); the method's code comes from the
  installed harness (``methods/``), a plugin's only with ``trust_plugins=True``;
* **merged** (``--merge``, methods whose update is one fixed matrix per layer:
  ``Method.mergeable``, LoRA and MultiLoRA): the base model with the update added to its
  weights (merged and written in float32), written by ``save_pretrained``;
  ``AutoModelForCausalLM.from_pretrained(DIR)`` loads it. A routed method is refused: its update depends on the input.

Every export folder holds ``export.json`` (what it is, which base model it needs, the run
it came from), the base model's tokenizer and a ``README.md`` that says how to load it.
Nothing is pickled and no code is copied. An existing non-empty folder is never overwritten.
"""

from __future__ import annotations

import importlib
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

from harness.adapters import (
    AdapterLayer,
    Method,
    PluginError,
    TargetShape,
    UnknownMethodError,
    all_methods,
    apply_method,
    get_method,
    load_plugin,
)
from harness.adapters.registry import BUILTIN_PACKAGE
from harness.common.files import atomic_write_json, read_json
from harness.common.manifest import sha256_file
from harness.model.base import load_base
from harness.model.load import cache_root, resolve_model
from harness.model.lower_cache import model_fingerprint
from harness.model.run_folder import load_run_model, read_run_spec
from harness.plan.study import method_source

EXPORT_JSON = "export.json"
MIXTURE_WEIGHTS = "adapter.safetensors"
FORMAT = "harness-export"
FORMAT_VERSION = 1
#: model sources the harness builds or converts into its cache (no portable name)
_BUILT_SOURCES = ("tiny-random", "smollm2")
#: largest |logit difference| (relative to the largest |logit|) a merge (done in float32) may
#: cause on the probe sequence before it is refused
MERGE_TOLERANCE = 1e-4


class ExportError(ValueError):
    """A run that cannot be exported as asked, or a folder that is not an export; the message
    names the folder or file and what would work."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_run` wrote: the folder, its ``kind`` (``peft``, ``mixture`` or
    ``merged``) and the base model it needs (a path or a Hugging Face id)."""

    folder: Path
    kind: str
    base_model: str
    method: str


# -- opening a run ----------------------------------------------------------------------


def is_builtin_method(name: str) -> bool:
    """Whether ``name`` is one of the built-in methods (the ``METHODS`` table of the harness's
    own ``methods/`` package)."""
    try:
        table = getattr(importlib.import_module(BUILTIN_PACKAGE), "METHODS", {})
    except ModuleNotFoundError:
        return False
    return name in table


def _trusted_method(name: str, plugins: list[str], where: str, trust_plugins: bool) -> Method:
    """The method ``name`` as :func:`harness.model.run_folder.import_run_plugins` finds it: a
    built-in one, one an installed package registers (entry point) or one this process
    already loaded needs no import; a plugin's modules ``plugins`` are imported only with
    ``trust_plugins``, else :class:`PluginError` names them and says how to opt in."""
    try:
        return get_method(name)  # imports installed code only (the built-in table, entry points)
    except UnknownMethodError:
        pass
    if not trust_plugins:
        raise PluginError(
            f"{where}: method {name!r} is not part of the installed harness; it comes from the "
            f"plugin module(s) {plugins or '(none recorded)'}, and importing a module runs its "
            "code, which an export folder never decides. If you trust it, put it on PYTHONPATH "
            "and pass trust_plugins=True (command line: --trust-plugins)"
        )
    for plugin in plugins:
        load_plugin(plugin)
    return get_method(name)


@dataclass
class _OpenedRun:
    spec: dict[str, Any]
    method: Method
    model: nn.Module
    tokenizer: Any
    handle: Any
    targets: list[TargetShape]
    base_name: str
    fingerprint: str


def _open_run(run_dir: Path, trust_plugins: bool) -> _OpenedRun:
    """The run's model on the CPU as the harness loads it
    (:func:`harness.model.run_folder.load_run_model`: plugins only with ``trust_plugins``,
    weights verified against the folder's manifest) and the base model it needs."""
    spec = read_run_spec(run_dir)
    if spec["method"] == "base":
        raise ExportError(
            f"{run_dir} is the untrained base model (method 'base'): there is no adapter to "
            "export; use the base model itself"
        )
    run = load_run_model(run_dir, device="cpu", trust_plugins=trust_plugins)
    source = resolve_model(spec["model"], cache_root({"cache_dir": spec.get("cache_dir")}))
    portable = source.name not in _BUILT_SOURCES and not Path(source.name).expanduser().exists()
    return _OpenedRun(
        spec=spec,
        method=run.handle.method,
        model=run.model,
        tokenizer=run.tokenizer,
        handle=run.handle,
        targets=run.handle.targets,
        # a hub id stays a hub id; a local or built folder is named by its absolute path
        base_name=source.name if portable else str(Path(source.path).resolve()),
        fingerprint=run.fingerprint,
    )


def adapter_module_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the adapter modules (the method's layers and peft's),
    frozen ones included (a staged method's earlier parts), without the wrapped base
    layers' weights: all that turns the base model into the trained one."""
    owners = [
        name for name, module in model.named_modules()
        if isinstance(module, AdapterLayer) or type(module).__module__.startswith("peft.")
    ]
    prefixes = tuple(f"{o}." for o in owners)
    state = {}
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if tensor is None or not name.startswith(prefixes) or ".base_layer." in f".{name}":
            continue
        state[name] = tensor.detach().to("cpu").contiguous().clone()
    return state


# -- export -----------------------------------------------------------------------------


def export_run(
    run_dir: str | Path, out: str | Path, merge: bool = False, trust_plugins: bool = False
) -> ExportResult:
    """Write the trained run ``run_dir`` to the new folder ``out`` (see the module docstring
    for the three kinds). Guarantees: ``out`` did not exist or was empty (never
    overwritten) and is written completely or not at all; its ``export.json`` names the
    base model the weights belong to (path or hub id, with a fingerprint of its config
    and weight files); a merged export changes no logit of a probe sequence by more than
    :data:`MERGE_TOLERANCE` (checked before writing)."""
    run_dir, out = Path(run_dir), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} exists and is not an empty folder; exports never overwrite: give a new --out")
    opened = _open_run(run_dir, trust_plugins)
    method = opened.method
    is_peft = type(method).export_peft is not Method.export_peft
    if merge and not method.mergeable:
        why = (
            "it routes each token to its own experts (input-dependent routing)"
            if method.routed
            else "its update depends on the input (input-dependent gating or structure)"
        )
        raise ExportError(
            f"{run_dir}: method {method.name!r} cannot be merged into the base weights: {why}, "
            "so no single weight matrix per layer reproduces it. Export it without --merge and "
            "load it with harness.load_exported(<folder>); methods that merge (Method.mergeable): "
            + ", ".join(sorted(m.label for m in all_methods().values() if m.mergeable))
        )
    kind = "merged" if merge else ("peft" if is_peft else "mixture")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        meta = _export_meta(opened, run_dir, kind)
        if kind == "peft":
            method.export_peft(
                opened.handle.config, opened.handle.adapter_state_dict(), opened.targets, tmp, opened.base_name
            )
        elif kind == "mixture":
            state = adapter_module_state(opened.model)
            missing = sorted(set(opened.handle.adapter_state_dict()) - set(state))
            if missing:
                raise ExportError(
                    f"{run_dir}: method {method.name!r} trains tensors outside its adapter layers "
                    f"(not AdapterLayer modules): {missing[:5]}; the export writes only adapter "
                    "layers, so its layers must subclass harness.adapters.AdapterLayer"
                )
            save_file(state, str(tmp / MIXTURE_WEIGHTS), metadata={"format": "pt"})
            meta["weights_sha256"] = sha256_file(tmp / MIXTURE_WEIGHTS)
        else:
            merged = _merged_model(opened, tmp)
            merged.save_pretrained(str(tmp))
        opened.tokenizer.save_pretrained(str(tmp))
        atomic_write_json(tmp / EXPORT_JSON, meta)
        (tmp / "README.md").write_text(_readme(meta))
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out, kind, opened.base_name, method.name)


def _export_meta(opened: _OpenedRun, run_dir: Path, kind: str) -> dict[str, Any]:
    spec, method = opened.spec, opened.method
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "method": method.name,
        "method_label": method.label,
        "builtin": is_builtin_method(method.name),
        "plugins": list(spec.get("plugins") or []) if not is_builtin_method(method.name) else [],
        "method_source": method_source(method),
        "method_config": spec["method_config"],
        "targets": [{"name": t.name, "d_in": t.d_in, "d_out": t.d_out} for t in opened.targets],
        "base_model": {
            "name_or_path": opened.base_name,
            "source": spec["model"]["source"],
            "dtype": spec["model"].get("dtype", "float32"),
            "fingerprint": opened.fingerprint,
        },
        "run": {
            "run_id": spec.get("run_id"),
            "study": spec.get("study"),
            "seed": spec.get("seed"),
            "variant": spec.get("variant"),
            "folder": str(run_dir.resolve()),
        },
    }


def _merged_model(opened: _OpenedRun, folder: Path) -> nn.Module:
    """The base model with the adapter's update added to each adapted weight, adapters
    removed: peft's own ``merge_and_unload`` for a peft adapter, ``W0 + D`` with
    ``D = delta(I)`` for a harness layer; checked on a probe sequence."""
    # merged and checked in float32: a half-precision run's weights upcast exactly, and the
    # update is not rounded into them (the merged model is written in float32)
    model, targets = opened.model.float(), opened.targets
    probe = torch.arange(min(16, model.config.vocab_size)).unsqueeze(0)
    with torch.no_grad():
        before = model(input_ids=probe).logits
    if type(opened.method).export_peft is not Method.export_peft:
        adapter = folder / "peft-adapter"
        opened.method.export_peft(
            opened.handle.config, opened.handle.adapter_state_dict(), targets, adapter, opened.base_name
        )
        base = load_base(opened.spec["model"], cache_root({"cache_dir": opened.spec.get("cache_dir")}), "cpu")
        merged = PeftModel.from_pretrained(base.model.float(), str(adapter)).merge_and_unload()
        shutil.rmtree(adapter)
    else:
        merged = model
        with torch.no_grad():
            for t in targets:
                parent_name, _, child = t.name.rpartition(".")
                parent = model.get_submodule(parent_name)
                layer = getattr(parent, child)
                linear = layer.base_layer
                eye = torch.eye(t.d_in, dtype=torch.float32, device=linear.weight.device)
                update = layer.delta(eye).to(torch.float32).T  # (d_out, d_in): D
                linear.weight.copy_((linear.weight.float() + update).to(linear.weight.dtype))
                setattr(parent, child, linear)
    merged.eval()
    with torch.no_grad():
        after = merged(input_ids=probe).logits
    allowed = MERGE_TOLERANCE
    difference = ((after.float() - before.float()).abs().max() / before.float().abs().max().clamp_min(1e-6)).item()
    if difference > allowed:
        raise ExportError(
            f"merging method {opened.method.name!r} changed the logits of a probe sequence by "
            f"{difference:.3g} of their largest magnitude (allowed {allowed:g}): its update is not one fixed matrix "
            "per layer, so it must not declare Method.mergeable; export it without --merge"
        )
    return merged


def _readme(meta: dict[str, Any]) -> str:
    base = meta["base_model"]["name_or_path"]
    run = meta["run"]
    how = {
        "peft": (
            f"A standard peft adapter ({meta['method_label']}):\n\n"
            "```python\nfrom peft import PeftModel\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"base = AutoModelForCausalLM.from_pretrained({base!r})\n"
            "model = PeftModel.from_pretrained(base, '<this folder>')\n"
            "tokenizer = AutoTokenizer.from_pretrained('<this folder>')\n```\n"
        ),
        "mixture": (
            f"The {meta['method_label']} adapter in the harness's layout (`adapter.safetensors` + "
            "`export.json`); the harness puts its layers into the base model:\n\n```python\n"
            "import harness\nfrom transformers import AutoTokenizer\n\n"
            f"model = harness.load_exported('<this folder>', base_model={base!r}"
            + (", trust_plugins=True" if not meta["builtin"] else "")
            + ")\ntokenizer = AutoTokenizer.from_pretrained('<this folder>')\n```\n"
            + ("" if meta["builtin"] else
               f"\nThe method comes from the plugin module(s) {meta['plugins']}, which must be "
               "importable (on PYTHONPATH); `trust_plugins=True` allows importing them.\n")
        ),
        "merged": (
            "A full transformers model: the adapter's update is merged into the base weights.\n\n"
            "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            "model = AutoModelForCausalLM.from_pretrained('<this folder>')\n"
            "tokenizer = AutoTokenizer.from_pretrained('<this folder>')\n```\n"
        ),
    }[meta["kind"]]
    return (
        f"# {meta['method_label']} — run {run['run_id']} (study {run['study']}, seed {run['seed']})\n\n"
        f"Exported by `python -m harness export` from `{run['folder']}`.\n\n"
        + ("" if meta["kind"] == "merged" else
           f"**Base model:** `{base}` ({meta['base_model']['dtype']}; fingerprint of its config and "
           f"weight files `{meta['base_model']['fingerprint']}`). The adapter only fits that model.\n\n")
        + how
    )


# -- loading an export --------------------------------------------------------------------


def read_export(folder: str | Path) -> dict[str, Any]:
    """``export.json`` of an export folder, or :class:`ExportError` naming what was given."""
    folder = Path(folder)
    path = folder / EXPORT_JSON
    if not path.exists():
        raise ExportError(
            f"{folder} is not a harness export (no {EXPORT_JSON}); write one with "
            "python -m harness export RUN_DIR --out DIR"
        )
    meta = read_json(path)
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ExportError(
            f"{path}: format {meta.get('format')!r} version {meta.get('format_version')!r}; this "
            f"harness reads {FORMAT!r} version {FORMAT_VERSION}"
        )
    return meta


def load_exported(
    folder: str | Path,
    base_model: str | Path | nn.Module | None = None,
    *,
    trust_plugins: bool = False,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """The exported trained model as a transformers model (``.generate()``, ``logits``).

    ``folder``: written by ``python -m harness export``. ``base_model``: the base model's
    folder or Hugging Face id, or an already loaded model (changed in place); default: the
    one ``export.json`` names. A base-model folder whose config and weight files differ from
    the run's (its fingerprint) is refused. ``dtype``: default the run's (adapters stay
    float32, as the harness trains them). A mixture's method is imported from the installed
    harness; a plugin method only with ``trust_plugins=True``.

    Guarantees: a mixture export gives the logits of the run loaded by
    :func:`harness.model.run_folder.load_run_model` (same base model and dtype; eval mode,
    where routing needs no token mask); a peft export returns a ``peft.PeftModel``; a merged
    export the plain ``AutoModelForCausalLM`` (float32 unless ``dtype`` says otherwise). The model is in eval mode with every
    parameter frozen."""
    folder = Path(folder)
    meta = read_export(folder)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if meta["kind"] == "merged":  # default: as written (float32)
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype or "auto")
    else:
        dtype = dtype or getattr(torch, meta["base_model"].get("dtype", "float32"))
        method = None
        if meta["kind"] == "mixture":  # refuse an untrusted plugin before loading anything
            method = _trusted_method(meta["method"], meta.get("plugins") or [], str(folder / EXPORT_JSON), trust_plugins)
            _warn_changed_code(method, meta, folder)
            weights = folder / MIXTURE_WEIGHTS
            if meta.get("weights_sha256") != sha256_file(weights):
                raise ExportError(
                    f"{weights} is not the file the export wrote (its SHA-256 differs from "
                    f"export.json's weights_sha256 {meta.get('weights_sha256')!r}); export the run again"
                )
        base = _base_model(meta, base_model, dtype, folder)
        if meta["kind"] == "peft":
            model = PeftModel.from_pretrained(base, str(folder))
        else:
            targets = [TargetShape(t["name"], t["d_in"], t["d_out"]) for t in meta["targets"]]
            _check_targets(base, targets, folder)
            handle = apply_method(base, method, method.make_config(**meta["method_config"]), targets)
            handle.load_state(load_file(str(folder / MIXTURE_WEIGHTS)))
            model = base
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    return model


def _base_model(meta: dict[str, Any], given: Any, dtype: torch.dtype, folder: Path) -> nn.Module:
    if isinstance(given, nn.Module):
        return given
    name = str(given) if given is not None else meta["base_model"]["name_or_path"]
    local = Path(name).expanduser()
    if local.exists():
        recorded = meta["base_model"]["fingerprint"]
        found = model_fingerprint(local, getattr(torch, meta["base_model"].get("dtype", "float32")))
        if found != recorded:
            raise ExportError(
                f"{folder / EXPORT_JSON}: the adapter was trained on base model "
                f"{meta['base_model']['name_or_path']!r} (fingerprint {recorded}), but {str(local)!r} "
                f"has other config or weight files (fingerprint {found}); give that model as base_model"
            )
    elif given is None and meta["base_model"]["source"] in _BUILT_SOURCES:
        raise ExportError(
            f"{folder / EXPORT_JSON}: base model {name!r} (built by the harness from source "
            f"{meta['base_model']['source']!r}) is not on this machine; pass base_model=<its folder>"
        )
    return AutoModelForCausalLM.from_pretrained(str(local) if local.exists() else name, dtype=dtype)


def _check_targets(model: nn.Module, targets: list[TargetShape], folder: Path) -> None:
    for t in targets:
        try:
            module = model.get_submodule(t.name)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear) or (module.in_features, module.out_features) != (t.d_in, t.d_out):
            found = "missing" if module is None else (
                f"{type(module).__name__}" + (f" {module.in_features}->{module.out_features}"
                                             if isinstance(module, nn.Linear) else "")
            )
            raise ExportError(
                f"{folder / EXPORT_JSON}: adapted module {t.name!r} ({t.d_in}->{t.d_out}) does not fit "
                f"this base model (there: {found}); give the base model the export names "
                f"(export.json: base_model)"
            )


def _warn_changed_code(method: Method, meta: dict[str, Any], folder: Path) -> None:
    recorded = (meta.get("method_source") or {}).get("digest")
    current = method_source(method).get("digest")
    if recorded and current and recorded != current:
        warnings.warn(
            f"{folder / EXPORT_JSON}: the code of method {meta['method']!r} changed since the "
            f"export (digest {recorded} then, {current} now: {method_source(method)['files']}); "
            "the layers are built by today's code",
            stacklevel=3,
        )
