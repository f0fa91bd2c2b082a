"""What a Hugging Face model directory holds, read and checked without torch or transformers.

    from pipefold.hf.files import inspect_model
    files = inspect_model("models/gpt2-small")      # or ".../config.json" for a random init
    files.model_type, files.num_layers, files.weight_files, files.tokenizer_file

`pipefold train --model` calls `inspect_model` while it checks its configuration, so a
directory with a missing shard, a family pipefold does not support or a tokenizer larger
than the model's vocabulary is refused (`ConfigError`, naming the file and the fix) before
torch is imported or any rank starts. `pipefold.hf.model` builds the model from it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipefold.errors import ConfigError

__all__ = [
    "SUPPORTED_FAMILIES",
    "TENSOR_PARALLEL_FAMILIES",
    "TOKENIZER_FILES",
    "ModelFiles",
    "inspect_model",
    "tokenizer_vocab_size",
    "check_tokenizer",
]

SUPPORTED_FAMILIES: dict[str, str] = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
}
"""config.json `model_type` -> the transformers class pipefold builds (decoder-only causal LMs
whose forward is embeddings, a list of blocks, a final norm and a head)."""

TENSOR_PARALLEL_FAMILIES = frozenset({"gpt2", "llama", "mistral", "qwen2"})
"""Families `pipefold.runtime.hf_tensor_parallel_plan` splits (`--tensor-parallel`)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "generation_config.json",
)
"""Files copied along when a model is saved (those that exist)."""

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class ModelFiles:
    """A model source: its config and, for a directory, its weight and tokenizer files."""

    config_path: Path
    config: dict[str, Any] = field(repr=False)
    directory: Path | None
    """The model directory; None for a bare config.json (random initialization)."""
    weight_files: tuple[Path, ...] = ()
    """The safetensors files (one, or the shards an index names); () for a random init."""
    weight_map: dict[str, str] | None = field(default=None, repr=False)
    """Tensor name -> shard file name, from model.safetensors.index.json; None for one file."""
    tokenizer_file: Path | None = None
    """tokenizer.json beside the config, if any."""

    @property
    def model_type(self) -> str:
        return str(self.config.get("model_type", ""))

    def _int(self, *keys: str) -> int:
        for key in keys:
            value = self.config.get(key)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        raise ConfigError(
            f"{self.config_path}: no integer {' / '.join(keys)}; the config.json of a {self.model_type} "
            "model must give it"
        )

    @property
    def vocab_size(self) -> int:
        return self._int("vocab_size")

    @property
    def num_layers(self) -> int:
        return self._int("num_hidden_layers", "n_layer")

    @property
    def num_heads(self) -> int:
        return self._int("num_attention_heads", "n_head")

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads of grouped-query attention (the attention heads where the config gives none)."""
        value = self.config.get("num_key_value_heads")
        return value if isinstance(value, int) and not isinstance(value, bool) else self.num_heads

    @property
    def hidden_size(self) -> int:
        return self._int("hidden_size", "n_embd")

    @property
    def max_positions(self) -> int:
        return self._int("max_position_embeddings", "n_positions")

    @property
    def tie_word_embeddings(self) -> bool:
        """Whether the head is the token embedding. Where config.json omits the key (or sets it to
        null), transformers' default for the family holds: tied for GPT2Config, untied for
        LlamaConfig, MistralConfig and Qwen2Config (as `pipefold.plan.hf_estimate.hf_ties`)."""
        tied = self.config.get("tie_word_embeddings")
        return self.model_type == "gpt2" if tied is None else bool(tied)

    @property
    def num_pipeline_layers(self) -> int:
        """Layers `pipefold.split` cuts the model into: the prefix, each block, the suffix."""
        return self.num_layers + 2


def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"{what}: cannot read {path} ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise ConfigError(f"{what}: {path} is not valid JSON ({error})") from None


def inspect_model(source: str | Path, *, field: str = "model.path") -> ModelFiles:
    """Read and check a model directory or a config.json; `field` names the setting in messages."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(
            f"{field}={str(source)!r} does not exist; give a Hugging Face model directory (config.json + "
            "*.safetensors) or a config.json to train from a random initialization"
        )
    directory: Path | None = path if path.is_dir() else None
    config_path = path / "config.json" if directory is not None else path
    if not config_path.is_file():
        raise ConfigError(
            f"{field}={str(source)!r} has no config.json; give a directory written by save_pretrained "
            "(config.json + model.safetensors)"
        )
    config = _read_json(config_path, field)
    if not isinstance(config, dict):
        raise ConfigError(f"{field}: {config_path} does not hold a JSON object")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"{field}: {config_path} has model_type={model_type!r}, a family pipefold does not support; "
            f"supported: {', '.join(sorted(SUPPORTED_FAMILIES))} (decoder-only causal LMs)"
        )
    weight_files: tuple[Path, ...] = ()
    weight_map: dict[str, str] | None = None
    if directory is not None:
        weight_files, weight_map = _weights_of(directory, field)
    tokenizer = config_path.parent / "tokenizer.json"
    files = ModelFiles(
        config_path=config_path,
        config=config,
        directory=directory,
        weight_files=weight_files,
        weight_map=weight_map,
        tokenizer_file=tokenizer if tokenizer.is_file() else None,
    )
    # Read the sizes now: a config missing one is refused here, not on the ranks.
    for name in ("vocab_size", "num_layers", "num_heads", "hidden_size", "max_positions"):
        getattr(files, name)
    return files


def _weights_of(directory: Path, field: str) -> tuple[tuple[Path, ...], dict[str, str] | None]:
    index = directory / INDEX_FILE
    if index.is_file():
        data = _read_json(index, field)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"{field}: {index} has no weight_map; re-save the model with save_pretrained")
        names = sorted(set(map(str, weight_map.values())))
        missing = [name for name in names if not (directory / name).is_file()]
        if missing:
            raise ConfigError(
                f"{field}: {index} names {len(names)} shard(s) but {len(missing)} are missing from "
                f"{directory}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}; copy every "
                "shard into the directory (or re-download the model)"
            )
        return tuple(directory / name for name in names), {str(k): str(v) for k, v in weight_map.items()}
    single = directory / SINGLE_FILE
    if single.is_file():
        return (single,), None
    shards = sorted(directory.glob("*.safetensors"))
    if shards:
        raise ConfigError(
            f"{field}: {directory} holds {[p.name for p in shards][:3]} but no {INDEX_FILE} naming which "
            f"tensor is in which shard; restore {INDEX_FILE} (save_pretrained writes it)"
        )
    bins = sorted(p.name for p in directory.glob("*.bin"))
    hint = (
        f" (it holds {bins[0]}: re-save the model with save_pretrained(dir, safe_serialization=True))"
        if bins
        else ""
    )
    raise ConfigError(
        f"{field}: {directory} has no {SINGLE_FILE} or {INDEX_FILE}{hint}; pipefold reads safetensors "
        f"weights, or give {directory / 'config.json'} to train from a random initialization"
    )


def tokenizer_vocab_size(path: Path) -> int:
    """Ids a tokenizer.json can produce: its largest id (vocabulary and added tokens) + 1."""
    data = _read_json(path, "tokenizer")
    ids: list[int] = []
    model = data.get("model", {}) if isinstance(data, dict) else {}
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        ids.extend(int(i) for i in vocab.values())
    elif isinstance(vocab, list):  # Unigram: a list of [piece, score]
        ids.append(len(vocab) - 1)
    for token in data.get("added_tokens", []) if isinstance(data, dict) else []:
        if isinstance(token, dict) and isinstance(token.get("id"), int):
            ids.append(token["id"])
    if not ids:
        raise ConfigError(
            f"tokenizer: {path} has no vocabulary; give the tokenizer.json saved with the model"
        )
    return max(ids) + 1


def check_tokenizer(files: ModelFiles, tokenizer: Path | None = None) -> int:
    """The tokenizer's vocabulary size; refuses one with more ids than the model's embedding rows."""
    path = tokenizer if tokenizer is not None else files.tokenizer_file
    if path is None:
        raise ConfigError(
            f"{files.config_path.parent} has no tokenizer.json to tokenize text with; save the model's "
            "tokenizer there (tokenizer.save_pretrained(dir)) or pass pre-tokenized ids "
            "(data.path=<tokens>.bin)"
        )
    size = tokenizer_vocab_size(path)
    if size > files.vocab_size:
        raise ConfigError(
            f"the tokenizer {path} produces ids up to {size - 1} but the model's vocab_size in "
            f"{files.config_path} is {files.vocab_size}; use the tokenizer the model was trained with, or "
            f"a config with vocab_size >= {size}"
        )
    return size
