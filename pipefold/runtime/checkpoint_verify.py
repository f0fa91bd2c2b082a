"""Per-file digests of a checkpoint: recorded at save, checked at load.

    digests = digest_files(staging, names[rank::num_ranks])     # each rank its share, then merged
    meta["files"] = {name: {"bytes": n, "sha256": hex}, ...}    # in pipefold.json
    problem = verify_files(target, meta["files"], mine)         # at load: None, or what is wrong

A shard with zeroed bytes used to load silently (the losses drifted), a truncated one failed
deep inside torch with an empty EOFError; both are now refused before anything is read,
naming the file. SHA-256 streamed in 1 MiB chunks (hashlib releases the GIL and uses the
CPU's SHA instructions where it has them); the ranks hash their shares in parallel.
It guards against damage (disk, copy, truncation), not against someone who rewrites
pipefold.json too: a checkpoint from an untrusted source is still untrusted (README, "Security").
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["CHUNK_BYTES", "digest_file", "digest_files", "verify_files"]

CHUNK_BYTES = 1 << 20


def digest_file(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of the file at `path`."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as file:
        while chunk := file.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": digest.hexdigest()}


def digest_files(directory: Path, names: Iterable[str]) -> dict[str, dict[str, Any]]:
    return {name: digest_file(directory / name) for name in names}


def verify_files(directory: Path, recorded: Mapping[str, Any], names: Iterable[str]) -> str | None:
    """What is wrong with the first of `names` in `directory` that does not match its recorded
    size and digest (a sentence naming the file); None when all match."""
    for name in names:
        path = directory / name
        entry = recorded[name]
        try:
            size = path.stat().st_size
        except OSError as error:
            return f"{str(path)!r} is missing or unreadable ({error.strerror or error})"
        if size != entry["bytes"]:
            return f"{str(path)!r} is truncated or grown: {size} bytes where {entry['bytes']} were written"
        try:
            found = digest_file(path)
        except OSError as error:
            return f"{str(path)!r} cannot be read ({error.strerror or error})"
        if found["sha256"] != entry["sha256"]:
            return f"{str(path)!r} is damaged: its SHA-256 differs from the one recorded when it was saved"
    return None
