"""Hugging Face decoder-only models as pipeline layers: load lazily, train, save back.

    from pipefold.hf.model import causal_lm_loss, load_causal_lm, save_causal_lm, next_token_loss
    lm = load_causal_lm("models/gpt2")           # a save_pretrained directory, or a config.json
    pipe = pipefold.Pipeline(lm.layers, loss_fn=next_token_loss, schedule="1f1b")
    ...
    save_causal_lm(lm.layers, "out/hf", lm.config, tokenizer_dir="models/gpt2")

`load_causal_lm` builds the model with its parameters on the meta device (buffers real),
cuts it with `pipefold.model.split.split` (a small real twin runs the forward, since the
model's own mask code cannot run on meta), and gives every piece a `fill`: when a rank
materializes its pieces (`pipefold.model.build.materialize`, which the Pipeline calls for
the layers it owns) it reads only their tensors from the safetensors files (`safe_open`,
one key at a time), or, from a bare config, initializes them with the model's own
`_init_weights`, seeded by module path (the same weights whatever the partition).

`transformers` and `safetensors` are the optional extra `pipefold[hf]`; only this module
imports them. Families: `pipefold.hf.files.SUPPORTED_FAMILIES`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipefold.errors import ConfigError
from pipefold.files import write_atomic
from pipefold.hf.files import SUPPORTED_FAMILIES, TOKENIZER_FILES, ModelFiles, inspect_model
from pipefold.model.split import Fill, SplitPiece, find_blocks, split
from pipefold.model.split_graph import GraphPiece
from pipefold.model.twin import Twin, default_twin

__all__ = [
    "CausalLM",
    "IGNORE_INDEX",
    "causal_lm_loss",
    "finish_save",
    "init_empty_weights",
    "load_causal_lm",
    "load_pretrained",
    "next_token_loss",
    "save_causal_lm",
    "state_dict_of",
    "twin_factory",
]

IGNORE_INDEX = -100
"""Label id the loss skips, as in transformers."""



def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - the extra is installed in development
        raise ConfigError(
            "Hugging Face models need the optional extra: pip install 'pipefold[hf]' "
            f"(transformers, safetensors, tokenizers); {error}"
        ) from None
    transformers.logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    return transformers


@contextmanager
def init_empty_weights() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers stay real (a rotary
    table computed in `__init__` keeps its values). Each parameter is created where its module
    creates it and moved to meta as it is registered, before any initialization runs on it."""
    original = nn.Module.register_parameter

    def register(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(module, name, param)
        if param is not None and not param.is_meta:
            moved = type(param)(param.to("meta"), requires_grad=param.requires_grad)
            moved.__dict__.update(param.__dict__)
            module._parameters[name] = moved

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def causal_lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """transformers' causal-LM loss: position t predicts `labels[:, t + 1]`; labels equal to
    -100 are skipped; the mean over the rest (`model(input_ids, labels=labels).loss`)."""
    shifted = labels[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
        shifted.reshape(-1),
        ignore_index=IGNORE_INDEX,
    )


def next_token_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """The same loss where `targets` are already shifted (targets[:, t] follows inputs[:, t]),
    as `pipefold.data.BatchSampler` gives them: the Pipeline's `loss_fn`."""
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


# -- configs, classes, twins ---------------------------------------------------------------------


def hf_config(files: ModelFiles) -> Any:
    """The transformers config of `files` (its config.json, read without a download)."""
    transformers = _transformers()
    config_class = transformers.CONFIG_MAPPING[files.model_type]
    return config_class.from_dict(dict(files.config))


def _model_class(model_type: str) -> Any:
    transformers = _transformers()
    if model_type not in SUPPORTED_FAMILIES:
        raise ConfigError(
            f"model_type={model_type!r} is a family pipefold does not support; supported: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    return getattr(transformers, SUPPORTED_FAMILIES[model_type])


def _build(config: Any, dtype: torch.dtype) -> nn.Module:
    cls = _model_class(config.model_type)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with init_empty_weights():
            model: nn.Module = cls(config)
    finally:
        torch.set_default_dtype(previous)
    model.train()
    return model


def twin_factory(model: nn.Module) -> Twin | None:
    """A `pipefold.model.twin.Twin` for a Hugging Face causal LM of a supported family (None
    for another); see `pipefold.model.twin.default_twin`."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_FAMILIES:
        return None
    return default_twin(model)


# -- loading ---------------------------------------------------------------------------------------


@dataclass
class CausalLM:
    """A loaded (not yet materialized) causal LM: the meta model and its pipeline layers."""

    model: nn.Module
    """The whole transformers model; its parameters stay on meta until a piece is materialized."""
    layers: list[nn.Module]
    """`[prefix, *blocks, suffix]` (`SplitPiece`s), for `pipefold.Pipeline`."""
    config: Any
    """The transformers config."""
    files: ModelFiles


def load_causal_lm(
    source: str | os.PathLike[str] | Any,
    *,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    seq_len: int | None = None,
    split_points: Sequence[str] | None = None,
) -> CausalLM:
    """A Hugging Face causal LM as pipeline layers, every parameter still on meta.

    `source`: a model directory (config.json + model.safetensors, or shards with
    model.safetensors.index.json), a config.json path, or a transformers config object
    (both: a random initialization). Materializing a piece (`SplitPiece.materialize_`, or
    `pipefold.model.build.materialize`) reads its tensors from the files, or initializes them
    with the model's `_init_weights` under `seed` and the module's path. `seq_len`: the
    length of the training sequences (default: 8, only shapes of the split matter).
    `split_points`: cut at these submodules through a graph capture (`pipefold.split`'s
    `split_points`) instead of at the blocks; the pieces then take sequences of `seq_len`
    tokens only (the capture fixes every size but the batch), so give it.
    """
    transformers = _transformers()
    if isinstance(source, transformers.PretrainedConfig):
        if source.model_type not in SUPPORTED_FAMILIES:
            raise ConfigError(
                f"load_causal_lm: model_type={source.model_type!r} is a family pipefold does not support; "
                f"supported: {', '.join(sorted(SUPPORTED_FAMILIES))}"
            )
        files = ModelFiles(config_path=Path("<config>"), config=source.to_dict(), directory=None)
        config = copy.deepcopy(source)
    else:
        files = inspect_model(Path(source), field="load_causal_lm(source)")
        config = hf_config(files)
    model = _build(config, dtype)
    length = min(seq_len or 8, files.max_positions)
    if split_points is not None and seq_len is None:
        raise ConfigError(
            f"load_causal_lm(split_points={list(split_points)!r}): give seq_len, the length of the "
            "training sequences; the graph capture fixes it"
        )
    example = (torch.zeros(1, length, dtype=torch.long),)
    layers = split(model, split_points=split_points, example_inputs=example)
    fill = _file_fill(files, model) if files.weight_files else _init_fill(model, seed)
    for layer in layers:
        if isinstance(layer, SplitPiece):
            layer.fill = fill
    return CausalLM(model=model, layers=layers, config=config, files=files)


def _file_fill(files: ModelFiles, model: nn.Module) -> Fill:
    # Checkpoints of the bare model (the hub's original "gpt2") name tensors without the
    # causal LM's prefix ("h.0.attn..." for "transformer.h.0.attn...").
    base = str(getattr(model, "base_model_prefix", "") or "")

    def fill(piece: SplitPiece, fresh: Mapping[str, Tensor]) -> None:
        from safetensors import safe_open

        wanted: dict[Path, list[tuple[str, str]]] = {}
        available = _keys(files)
        for name in fresh:
            key = name
            if key not in available and base and key.startswith(base + "."):
                key = key[len(base) + 1 :]
            if key not in available:
                if name in _buffer_names(model):
                    continue  # a buffer the model computes, not saved (a rotary table)
                raise ConfigError(
                    f"{files.directory}: no tensor {name!r} in "
                    f"{', '.join(p.name for p in files.weight_files)}; "
                    "the checkpoint does not fit this config.json (a different family or size)"
                )
            wanted.setdefault(available[key], []).append((name, key))
        for path, names in wanted.items():
            with safe_open(str(path), framework="pt") as handle:
                for name, key in names:
                    value = handle.get_tensor(key)
                    target = fresh[name]
                    if value.shape != target.shape:
                        raise ConfigError(
                            f"{path}: {key} has shape {list(value.shape)} but the model built from "
                            f"{files.config_path} expects {list(target.shape)}; the checkpoint does not fit "
                            "its config.json"
                        )
                    target.copy_(value)

    return fill


_KEYS_CACHE: dict[tuple[Path, ...], dict[str, Path]] = {}


def _keys(files: ModelFiles) -> dict[str, Path]:
    """Tensor name -> the file holding it (from the index, or the single file's header)."""
    cached = _KEYS_CACHE.get(files.weight_files)
    if cached is not None:
        return cached
    if files.weight_map is not None and files.directory is not None:
        result = {name: files.directory / shard for name, shard in files.weight_map.items()}
    else:
        from safetensors import safe_open

        result = {}
        for path in files.weight_files:
            with safe_open(str(path), framework="pt") as handle:
                result.update(dict.fromkeys(handle.keys(), path))
    _KEYS_CACHE[files.weight_files] = result
    return result


def _buffer_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_buffers()}


def _seed_of(seed: int, path: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(path.encode("utf-8"))) % (2**63)


def _init_fill(model: nn.Module, seed: int) -> Fill:
    """Random init with the model's own `_init_weights`, each module under a seed from its
    path, so a parameter gets the same values on whichever rank materializes it."""
    init_weights: Any = getattr(model, "_init_weights")  # noqa: B009 - nn.Module's __getattr__ types it as a Tensor

    def init_module(path: str, module: nn.Module) -> None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_seed_of(seed, path))
            init_weights(module)

    def fill(piece: SplitPiece, fresh: Mapping[str, Tensor]) -> None:
        fresh_ids = {id(t) for t in fresh.values()}
        root = piece.root
        modules = _modules_to_init(piece)
        own = tuple(p + "." for p in (_owners(piece) if isinstance(piece, GraphPiece) else piece.paths))
        # Tensors this init must not touch: those already real, and those a module outside the
        # piece owns (a tied head's weight is the embedding's: initialized as the embedding's).
        foreign = {
            name: t for name, t in fresh.items() if not (name.rpartition(".")[0] + ".").startswith(own)
        }
        # A graph piece's modules may hold tensors of other pieces (a block cut inside): kept too.
        holders = [*root.parameters(), *root.buffers()] if isinstance(piece, GraphPiece) else []
        kept = [*piece.parameters(), *piece.buffers(), *holders, *foreign.values()]
        foreign_ids = {id(t) for t in foreign.values()}
        skipped = list({id(t): t for t in kept if id(t) not in fresh_ids or id(t) in foreign_ids}.values())
        for tensor in skipped:
            tensor._is_hf_initialized = True  # type: ignore[attr-defined]
        try:
            for sub_path, module in modules:
                init_module(sub_path, module)
        finally:
            for tensor in skipped:
                del tensor._is_hf_initialized  # type: ignore[attr-defined]
        for owner in sorted({name.rpartition(".")[0] for name in foreign}):
            init_module(owner, root.get_submodule(owner) if owner else root)

    return fill


def _modules_to_init(piece: SplitPiece) -> list[tuple[str, nn.Module]]:
    """The modules whose `_init_weights` give a piece's tensors values, innermost first: every
    module under a piece cut at the blocks' paths; for a piece cut at named points (which
    registers tensors, not modules), the modules owning its tensors."""
    root = piece.root
    if isinstance(piece, GraphPiece):
        # The owners and the modules above them, up to the blocks' container (as the block route
        # initializes a whole block: a GPT-2 attention rescales its c_proj's init), innermost first.
        found = find_blocks(root)
        parts = found[0].split(".") if found is not None else []
        above = {"", *(".".join(parts[: k + 1]) for k in range(len(parts)))}
        paths: set[str] = set()
        for owner in _owners(piece):
            names = owner.split(".")
            for k in range(len(names), 0, -1):
                if ".".join(names[:k]) in above:
                    break
                paths.add(".".join(names[:k]))
        ordered = sorted(paths, key=lambda p: (-p.count("."), p))
        return [(path, root.get_submodule(path)) for path in ordered]
    modules: list[tuple[str, nn.Module]] = []
    for path in piece.paths:
        start = root.get_submodule(path) if path else root
        modules += reversed(list(start.named_modules(prefix=path)))
    return modules


def _owners(piece: SplitPiece) -> list[str]:
    """The paths of the modules owning a graph piece's tensors, innermost first."""
    return sorted({path.rpartition(".")[0] for path in piece.paths}, key=lambda p: (-p.count("."), p))


def load_pretrained(directory: str | os.PathLike[str]) -> tuple[nn.Module, Any]:
    """transformers' own `AutoModelForCausalLM.from_pretrained(directory)` (eval mode) and the
    directory's tokenizer (a `tokenizers.Tokenizer`, None without tokenizer.json)."""
    transformers = _transformers()
    model: nn.Module = transformers.AutoModelForCausalLM.from_pretrained(str(directory))
    model.eval()
    tokenizer = None
    if (Path(directory) / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    return model, tokenizer


# -- saving ----------------------------------------------------------------------------------------


def state_dict_of(layers: Sequence[nn.Module], owned: Iterable[int] | None = None) -> dict[str, Tensor]:
    """The tensors HF's save_pretrained writes, from split pieces: parameters and persistent
    buffers under the module's own names, a shared parameter once (a tied head is not written).

    `owned`: the indices of the pieces this process holds (`Pipeline.local_modules`); a name is
    taken from the first piece holding it, so ranks that each pass theirs write disjoint sets.
    None: every piece whose tensors are real."""
    first_holder: dict[str, int] = {}
    for index, piece in enumerate(layers):
        if not isinstance(piece, SplitPiece):
            raise ConfigError(
                f"save_causal_lm: layer {index} is a {type(piece).__name__}, not a split piece; pass the "
                "layers of load_causal_lm (or a state dict with the model's own names)"
            )
        for name in [*piece.parameter_names().values(), *piece.buffer_names().values()]:
            first_holder.setdefault(name, index)
    wanted = set(range(len(layers))) if owned is None else set(owned)
    result: dict[str, Tensor] = {}
    for index, piece in enumerate(layers):
        if index not in wanted:
            continue
        assert isinstance(piece, SplitPiece)
        persistent = set(piece.root.state_dict(keep_vars=True))
        names = {**piece.parameter_names(), **piece.buffer_names()}
        tensors = [
            *piece.named_parameters(remove_duplicate=False), *piece.named_buffers(remove_duplicate=False)
        ]
        for local, tensor in tensors:
            name = names[local]
            if name in persistent and first_holder[name] == index and not tensor.is_meta:
                result.setdefault(name, tensor.detach())
    return result


def _tied_names(config: Any) -> set[str]:
    if getattr(config, "tie_word_embeddings", False):
        return {"lm_head.weight"}
    return set()


def _shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


def _staging(directory: Path) -> Path:
    return directory.parent / f".{directory.name}.partial"


def save_causal_lm(
    source: Sequence[nn.Module] | Mapping[str, Tensor],
    directory: str | os.PathLike[str],
    config: Any,
    *,
    tokenizer_dir: str | os.PathLike[str] | None = None,
    shard: tuple[int, int] | None = None,
) -> Path:
    """Write `source` (split pieces, or a state dict with the model's own names) in the Hugging
    Face format, so `AutoModelForCausalLM.from_pretrained(directory)` loads it.

    One process (`shard=None`): config.json, model.safetensors and the tokenizer files of
    `tokenizer_dir`, staged and renamed into place. Several ranks: each calls it with
    `shard=(its index, number of shards)` to write `model-0000i-of-0000n.safetensors` with
    its own tensors, then, once all have (a barrier), one calls `finish_save`, which writes
    the index, the config and the tokenizer and moves the directory into place.
    """
    from safetensors.torch import save_file

    target = Path(directory)
    staging = _staging(target)
    state = dict(source) if isinstance(source, Mapping) else state_dict_of(source)
    tied = _tied_names(config)
    tensors = {
        name: tensor.detach().to("cpu").contiguous()
        for name, tensor in state.items()
        if name not in tied and not tensor.is_meta
    }
    staging.mkdir(parents=True, exist_ok=True)
    name = "model.safetensors" if shard is None else _shard_name(*shard)
    temporary = staging / f".{name}.tmp"
    save_file(tensors, str(temporary), metadata={"format": "pt"})
    os.replace(temporary, staging / name)
    if shard is None:
        return finish_save(target, config, tokenizer_dir=tokenizer_dir)
    return staging / name


def finish_save(
    directory: str | os.PathLike[str], config: Any, *, tokenizer_dir: str | os.PathLike[str] | None = None
) -> Path:
    """After every shard is written: the index (for shards), config.json and the tokenizer files,
    then the staged directory replaces `directory`. Call on one rank only."""
    from safetensors import safe_open

    target = Path(directory)
    staging = _staging(target)
    shards = sorted(staging.glob("model-*-of-*.safetensors"))
    if shards:
        weight_map: dict[str, str] = {}
        total = 0
        for path in shards:
            with safe_open(str(path), framework="pt") as handle:
                for key in handle.keys():
                    weight_map[key] = path.name
                    info = handle.get_slice(key)
                    numel = 1
                    for size in info.get_shape():
                        numel *= size
                    total += numel * _itemsize(info.get_dtype())
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        write_atomic(staging / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
    config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    text = json.dumps(config_dict, indent=2, sort_keys=True, default=str) + "\n"
    write_atomic(staging / "config.json", text)
    if tokenizer_dir is not None:
        source = Path(tokenizer_dir)
        for file_name in TOKENIZER_FILES:
            if (source / file_name).is_file():
                shutil.copyfile(source / file_name, staging / file_name)
    if target.exists():
        old = target.parent / f".{target.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, target)
    return target


_ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}


def _itemsize(dtype: str) -> int:
    return _ITEMSIZE.get(dtype, 4)
