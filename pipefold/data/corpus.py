"""The built-in corpus: the Python standard library's own source, read as bytes.

Every Python installation ships it, so the main job trains without a download.

- Files: every `*.py` under `sysconfig.get_paths()["stdlib"]`, except `site-packages`
  and `dist-packages` (they differ between machines), in sorted POSIX relative-path
  order, each followed by a newline, until `max_bytes` is reached (the last file is cut).
- Vocabulary: the 256 byte values; token id == byte value. Every file decodes to it,
  whatever its characters, and the mapping needs no table (`encode` / `decode`).
- Split: the first `1 - val_fraction` of the bytes train, the rest validate; a
  contiguous cut, so no file straddles into both sets except the one at the cut.

The same Python version therefore gives the same corpus on every machine.
No torch import.
"""

from __future__ import annotations

import functools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from pipefold.errors import ConfigError

__all__ = ["VOCAB_SIZE", "Corpus", "corpus_split_sizes", "encode", "decode", "stdlib_files", "load_corpus"]

VOCAB_SIZE = 256
"""Token ids are byte values 0..255."""

_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})


def encode(text: str) -> bytes:
    """Text -> token ids (UTF-8 bytes)."""
    return text.encode("utf-8")


def decode(ids: bytes | bytearray | list[int]) -> str:
    """Token ids -> text; a multi-byte character cut by sampling becomes U+FFFD."""
    return bytes(ids).decode("utf-8", errors="replace")


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The standard library's .py files, in deterministic (sorted relative path) order."""
    base = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    if not base.is_dir():
        raise ConfigError(f"data: the corpus directory {str(base)!r} does not exist; pass an existing root")
    found: list[Path] = []
    # os.walk with pruning: site-packages can be far larger than the stdlib itself.
    for directory, subdirs, files in os.walk(base):
        subdirs[:] = [name for name in subdirs if name not in _SKIPPED_DIRS]
        found.extend(Path(directory, name) for name in files if name.endswith(".py"))
    return sorted(found, key=lambda path: path.relative_to(base).as_posix())


@dataclass(frozen=True)
class Corpus:
    """Train and validation bytes, and where they came from."""

    train: bytes
    val: bytes
    num_files: int
    root: str

    @property
    def num_bytes(self) -> int:
        return len(self.train) + len(self.val)


def _cut(num_bytes: int, val_fraction: float) -> int:
    """Where the validation tail starts: both parts keep at least one byte."""
    return min(max(1, round(num_bytes * (1.0 - val_fraction))), num_bytes - 1)


@functools.lru_cache(maxsize=16)  # the stdlib does not change under a running process
def corpus_split_sizes(
    max_bytes: int = 4_000_000, val_fraction: float = 0.1, root: Path | None = None
) -> tuple[int, int]:
    """(train bytes, validation bytes) `load_corpus` would return, from the files' sizes alone
    (no file is read): what `pipefold train` checks its evaluation against."""
    base = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    total = 0
    for path in stdlib_files(base):
        if total >= max_bytes:
            break
        total += min(path.stat().st_size + 1, max_bytes - total)  # each file and its b"\n"
    if total < 2:
        return total, 0
    cut = _cut(total, val_fraction)
    return cut, total - cut


def load_corpus(
    max_bytes: int = 4_000_000, val_fraction: float = 0.1, root: Path | None = None
) -> Corpus:
    """Read up to `max_bytes` of stdlib source and split it (see the module docstring)."""
    if max_bytes < 2:
        raise ConfigError(f"data.max_bytes must be >= 2; got {max_bytes}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(
            f"data.val_fraction must be strictly between 0 and 1; got {val_fraction} (e.g. 0.1)"
        )
    base = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    chunks: list[bytes] = []
    total = num_files = 0
    for path in stdlib_files(base):
        if total >= max_bytes:
            break
        data = path.read_bytes() + b"\n"
        chunks.append(data[: max_bytes - total])
        total += len(chunks[-1])
        num_files += 1
    text = b"".join(chunks)
    if len(text) < 2:
        raise ConfigError(
            f"data: found no Python source under {str(base)!r}; point root at a directory of .py files"
        )
    cut = _cut(len(text), val_fraction)
    return Corpus(train=text[:cut], val=text[cut:], num_files=num_files, root=str(base))
