"""Token streams for a Hugging Face model: a text file or directory tokenized with the model's
own tokenizer, or a pre-tokenized token file, split into train and validation ids.

    data = load_tokens("corpus/", vocab_size=50257, tokenizer_file="models/gpt2/tokenizer.json")
    data = load_tokens("train.bin", vocab_size=50257)      # nanoGPT's flat uint16 ids
    sampler = BatchSampler(data.train, batch_size=8, seq_len=256)   # (inputs, targets) batches

A token file (`.bin`) is a flat array of ids, as nanoGPT's prepare scripts write them:
uint16 where the vocabulary fits (<= 65536 ids), else uint32 (`token_dtype` overrides); it
is memory-mapped, never read whole. Text is every regular file under a directory (sorted
relative paths, hidden files skipped) or the one file, decoded as UTF-8 and encoded with
the tokenizer (`tokenizers`, the `pipefold[hf]` extra). The split is contiguous: the last
`val_fraction` of the ids validate. Ids >= the model's vocab_size are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipefold.errors import ConfigError

__all__ = ["TOKEN_DTYPES", "TokenData", "load_tokens", "token_dtype", "is_token_file", "token_split_sizes"]

TOKEN_DTYPES = ("auto", "uint16", "uint32")
TOKEN_FILE_SUFFIXES = (".bin",)


def is_token_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` names a pre-tokenized token file (by its suffix) rather than text."""
    return Path(path).suffix in TOKEN_FILE_SUFFIXES


def token_dtype(vocab_size: int, requested: str = "auto") -> np.dtype[Any]:
    """The dtype of a token file's ids: uint16 when every id fits, else uint32 (or `requested`)."""
    if requested not in TOKEN_DTYPES:
        raise ConfigError(
            f"data.token_dtype={requested!r} is not allowed: use one of {', '.join(TOKEN_DTYPES)}"
        )
    if requested == "auto":
        requested = "uint16" if vocab_size <= 2**16 else "uint32"
    return np.dtype(requested)


@dataclass(frozen=True)
class TokenData:
    """Train and validation ids (1-D integer arrays), and where they came from."""

    train: np.ndarray
    val: np.ndarray
    source: str
    num_files: int

    @property
    def num_tokens(self) -> int:
        return int(self.train.shape[0] + self.val.shape[0])


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found: list[Path] = []
    for directory, subdirs, files in os.walk(path):
        subdirs[:] = sorted(name for name in subdirs if not name.startswith("."))
        found.extend(Path(directory, name) for name in files if not name.startswith("."))
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


def _tokenize(path: Path, tokenizer_file: Path) -> tuple[np.ndarray, int]:
    try:
        from tokenizers import Tokenizer
    except ImportError as error:  # pragma: no cover - the extra is installed in development
        raise ConfigError(
            f"data.path={str(path)!r} is text: tokenizing it needs the optional extra "
            f"(pip install 'pipefold[hf]'), or pass pre-tokenized ids (<tokens>.bin); {error}"
        ) from None
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    files = _text_files(path)
    texts = []
    for file in files:
        try:
            texts.append(file.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(
                f"data.path: {file} is not UTF-8 text; remove it from {path} or pass pre-tokenized ids "
                "(<tokens>.bin)"
            ) from None
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        ids.extend(encoding.ids)
    return np.asarray(ids, dtype=np.int64), len(files)


def _cut(num_ids: int, val_fraction: float) -> int:
    """Where the validation tail starts: both parts keep at least two ids."""
    return min(max(2, round(num_ids * (1.0 - val_fraction))), num_ids - 2)


def token_split_sizes(
    path: str | os.PathLike[str],
    *,
    vocab_size: int,
    token_dtype_name: str = "auto",
    val_fraction: float = 0.1,
) -> tuple[int, int]:
    """(train ids, validation ids) `load_tokens` would return for the token file `path`, from its
    size alone (nothing is read)."""
    num_ids = Path(path).stat().st_size // token_dtype(vocab_size, token_dtype_name).itemsize
    if num_ids < 4:
        return num_ids, 0
    cut = _cut(num_ids, val_fraction)
    return cut, num_ids - cut


def load_tokens(
    path: str | os.PathLike[str],
    *,
    vocab_size: int,
    tokenizer_file: str | os.PathLike[str] | None = None,
    token_dtype_name: str = "auto",
    val_fraction: float = 0.1,
) -> TokenData:
    """The ids of `path` (see the module docstring), split into train and validation."""
    source = Path(path)
    if not source.exists():
        raise ConfigError(
            f"data.path={str(path)!r} does not exist; give a text file, a directory of text files or a "
            "token file (<name>.bin)"
        )
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"data.val_fraction={val_fraction} is not allowed: use a value strictly between 0 and 1"
        )
    num_files = 1
    if is_token_file(source):
        dtype = token_dtype(vocab_size, token_dtype_name)
        size = source.stat().st_size
        if size == 0 or size % dtype.itemsize:
            raise ConfigError(
                f"data.path={str(path)!r} has {size} bytes, not a whole number of {dtype.name} ids; write it "
                f"as a flat {dtype.name} array (or set data.token_dtype)"
            )
        ids: np.ndarray = np.memmap(source, dtype=dtype, mode="r")
    else:
        if tokenizer_file is None:
            raise ConfigError(
                f"data.path={str(path)!r} is text but the model has no tokenizer.json; save its tokenizer "
                "beside config.json, or pass pre-tokenized ids (<tokens>.bin)"
            )
        ids, num_files = _tokenize(source, Path(tokenizer_file))
    if ids.shape[0] < 4:
        raise ConfigError(f"data.path={str(path)!r} holds {ids.shape[0]} tokens; give more text")
    largest = int(ids.max())
    if largest >= vocab_size:
        raise ConfigError(
            f"data.path={str(path)!r} holds token id {largest} but the model's vocab_size is {vocab_size}; "
            "tokenize with the model's own tokenizer"
            + (" (or set data.token_dtype: ids read with the wrong width)" if is_token_file(source) else "")
        )
    cut = _cut(ids.shape[0], val_fraction)
    return TokenData(train=ids[:cut], val=ids[cut:], source=str(source), num_files=num_files)
