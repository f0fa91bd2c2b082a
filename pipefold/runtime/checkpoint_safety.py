"""Reading DCP's `.metadata` pickle safely: a FileSystemReader whose unpickler admits only an
explicit list of exact (module, name) pairs (DCP's metadata types, torch.Size, dtypes, paths).

    metadata = SafeReader(path).read_metadata()      # a CheckpointError if it names anything else

`load_checkpoint` (checkpoint.py) reads every checkpoint through it; docs/checkpoint.md, "Safety".
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from pipefold.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from torch.distributed.checkpoint.metadata import Metadata

__all__ = ["SafeReader"]


class SafeReader(FileSystemReader):
    """DCP's reader, but its `.metadata` pickle may only name DCP's metadata types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = Path(self.path) / ".metadata"
        try:
            data = path.read_bytes()
        except OSError as error:
            raise ConfigError(
                f"checkpoint {str(self.path)!r} lacks DCP's .metadata ({error}); it is incomplete"
            ) from None
        try:
            metadata: Metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {error}") from None
        except Exception as error:  # a damaged pickle raises any of a dozen types
            raise CheckpointError(
                f"{path} is damaged ({type(error).__name__}: {error}); the checkpoint cannot be read: "
                "resume from another checkpoint or start afresh"
            ) from None
        # As DCP's own reader does: older checkpoints have no storage_meta; it carries the load id.
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# Exact (module, name) pairs: a module-wide rule would let pickle's dotted names reach
# anything the module imports (("...filesystem", "os.system") resolves to os.system).
_ALLOWED_GLOBALS = frozenset(
    {
        (_DCP_METADATA, "Metadata"),
        (_DCP_METADATA, "MetadataIndex"),
        (_DCP_METADATA, "StorageMeta"),
        (_DCP_METADATA, "TensorStorageMetadata"),
        (_DCP_METADATA, "BytesStorageMetadata"),
        (_DCP_METADATA, "ChunkStorageMetadata"),
        (_DCP_METADATA, "TensorProperties"),
        (_DCP_METADATA, "_MEM_FORMAT_ENCODING"),
        ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        # StorageMeta.checkpoint_id is the path the checkpoint was written to.
        ("pathlib", "PosixPath"),
        ("pathlib", "WindowsPath"),
        ("pathlib", "PurePosixPath"),
        ("pathlib", "PureWindowsPath"),
        ("pathlib._local", "PosixPath"),
        ("pathlib._local", "WindowsPath"),
    }
    | {("torch", name) for name, value in vars(torch).items() if isinstance(value, torch.dtype)}
)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise CheckpointError(
            f"checkpoint metadata names {module}.{name}, which a DCP checkpoint never holds; refusing to "
            "unpickle it (the file is corrupt or not from save_checkpoint)"
        )
