"""Same-host transport: boundary tensors through a shared-memory file instead of sockets.

Design notes: docs/decisions.md, "shared-memory channels".
"""

from __future__ import annotations

import ctypes
import mmap
import os
import platform
import secrets
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from pipefold.errors import PipelineError
from pipefold.runtime.transport.doorbell import Doorbell, Ringer

__all__ = [
    "BYTE_VIEW_MAX_BYTES", "JOB_ENV", "SHM_DIR", "SharedFile", "ShmChannel", "byte_view", "job_prefix",
    "layout", "shm_name", "shm_supported",
]

SHM_DIR = Path("/dev/shm")
JOB_ENV = "PIPEFOLD_JOB"
"""Set by the launcher to a token of its job: every shared-memory file a rank creates is named
`pipefold-<job>-...`, so the launcher (or, once it is gone, its janitor) removes the job's files
that a killed rank could not (pipefold/runtime/processes/janitor.py)."""


def job_prefix(job: str | None = None) -> str:
    """The name prefix of the files of `job` (default: this process's job, where a launcher set
    one), e.g. "pipefold-3fa2c1d0e4b5-"; "pipefold-" outside a launched job."""
    job = os.environ.get(JOB_ENV, "") if job is None else job
    return f"pipefold-{job}-" if job else "pipefold-"


def shm_name(rest: str) -> str:
    """The name of a shared-memory file of this job: its prefix, then `rest`."""
    return job_prefix() + rest
_HEADER_BYTES = 4096
_ALIGN = 64
# Header slots (int64 indices), each on its own 64-byte cache line so the sender's and the
# receiver's writes do not share a line: magic, published (sender), consumed (receiver).
_MAGIC, _PUBLISHED, _CONSUMED = 0, 8, 16
_MAX_VIEWS = 4096
"""Typed views of the data region a channel keeps (a step's messages land at the same offsets
every step, so these are the few views of its slots; the bound only matters for shapes that
change every step)."""


def shm_supported() -> bool:
    """Whether this machine can use shared-memory channels (x86-64 Linux with /dev/shm)."""
    return (
        platform.system() == "Linux"
        and platform.machine().lower() in ("x86_64", "amd64")
        and SHM_DIR.is_dir()
        and os.access(SHM_DIR, os.W_OK)
    )


def _align(offset: int) -> int:
    return (offset + _ALIGN - 1) // _ALIGN * _ALIGN


def layout(sizes: Sequence[int], start: int = 0) -> tuple[list[int], int]:
    """Offsets of tensors of `sizes` bytes placed one after another from `start`
    (each on a 64-byte boundary), and the end offset."""
    offsets = []
    position = start
    for size in sizes:
        position = _align(position)
        offsets.append(position)
        position += size
    return offsets, position


BYTE_VIEW_MAX_BYTES = 1 << 18
"""Largest buffer `byte_view` covers: below it a tensor copy's fixed dispatch is what the byte
copy saves; above it the copy itself dominates, and torch's copy may use several threads."""


def byte_view(tensor: Tensor) -> memoryview | None:
    """The memory of a contiguous CPU `tensor` as a writable byte view (for `read_bytes`), or
    None where there is none to take (another device, not contiguous, no bytes, larger than
    `BYTE_VIEW_MAX_BYTES`).

    The view holds no reference to the tensor: whoever keeps it must keep the tensor alive
    for as long (`ReceiveBuffers` keeps both in one entry).
    """
    size = tensor.nbytes
    if not 0 < size <= BYTE_VIEW_MAX_BYTES or tensor.device.type != "cpu" or not tensor.is_contiguous():
        return None
    if tensor.is_conj() or tensor.is_neg():  # lazily conjugated or negated: not its bytes
        return None
    return memoryview((ctypes.c_char * size).from_address(tensor.data_ptr())).cast("B")


_STRIDED = torch.strided
_memmove = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)(
    ctypes._memmove_addr  # type: ignore[attr-defined]
)
"""libc's memmove called with the GIL held (`ctypes.memmove` releases and retakes it around the
call: a few hundred nanoseconds, and a chance for another thread to take the interpreter)."""


def _slots(tensors: Sequence[Tensor], start: int) -> tuple[list[int], int]:
    """`layout` of `tensors` from `start`, inlined for the per-message path (`nbytes` is one
    attribute read where `numel() * element_size()` is two calls)."""
    offsets = []
    position = start
    for tensor in tensors:
        position = (position + _ALIGN - 1) // _ALIGN * _ALIGN
        offsets.append(position)
        position += tensor.nbytes
    return offsets, position


def new_token() -> int:
    """A random non-zero 63-bit value that names a channel file and marks its header."""
    return secrets.randbits(62) + 1


class SharedFile:
    """A file in /dev/shm mapped into this process: its name, descriptor and mapping.

    It owns the descriptor from construction: closed by `close`, or when the object is
    collected (the mapping then closes itself). Views into `map` must be dropped before
    `close` unmaps it; a view still alive defers the unmapping to the garbage collector.
    """

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.fd = fd
        self.map = mmap.mmap(fd, size)
        self._closer = weakref.finalize(self, os.close, fd)

    @classmethod
    def create(cls, directory: Path, name: str, size: int, *, allocate: int) -> SharedFile:
        """Create the file with `size` bytes, the first `allocate` of them backed by pages
        now (posix_fallocate: a full /dev/shm fails here, never as a SIGBUS later)."""
        path = directory / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            os.posix_fallocate(fd, 0, allocate)
            return cls(path, fd, size)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            raise

    @classmethod
    def open(cls, directory: Path, name: str, size: int) -> SharedFile | None:
        """The existing file, or None when it is not there or not `size` bytes long."""
        path = directory / name
        try:
            fd = os.open(path, os.O_RDWR)
        except OSError:
            return None
        try:
            if os.fstat(fd).st_size != size:
                os.close(fd)
                return None
            return cls(path, fd, size)
        except (OSError, ValueError):
            os.close(fd)
            return None

    @property
    def alive(self) -> bool:
        return self._closer.alive

    def unlink(self) -> None:
        """Remove the name; every mapping stays valid."""
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        if not self._closer.alive:
            return
        try:
            self.map.close()
        except BufferError:  # a tensor view is still alive somewhere; the GC unmaps later
            pass
        self._closer()


class ShmChannel:
    """One direction of a same-host channel; see docs/decisions.md, "shared-memory channels".

    The sender creates it with `create`, the receiver with `open`; `capacity` is the
    largest number of data bytes one step may put through it.
    """

    def __init__(self, file: SharedFile, capacity: int, *, is_sender: bool) -> None:
        self._file = file
        self.path = file.path
        self.capacity = capacity
        self.is_sender = is_sender
        self._header = np.frombuffer(file.map, dtype=np.int64, count=_HEADER_BYTES // 8)
        # The same words as Python ints: a waiting receiver reads `published` in a loop, and
        # indexing a memoryview is a third of a numpy element read plus `int()`.
        self._words = memoryview(file.map)[:_HEADER_BYTES].cast("q")
        # The data region as bytes: a receive into buffers with byte views (`read_bytes`) is one
        # slice assignment per tensor, where a tensor copy costs a few microseconds of dispatch.
        self._bytes = memoryview(file.map)[_HEADER_BYTES : _HEADER_BYTES + capacity]
        self._data = torch.frombuffer(file.map, dtype=torch.uint8, offset=_HEADER_BYTES, count=capacity)
        # The data region's address, for byte copies in (valid while `_data` holds the mapping).
        self._address = self._data.data_ptr()
        # (offset, dtype, shape) -> the data region there as that tensor: a message's slot is
        # the same every step, and slicing and viewing the region anew took three tensor
        # constructions per tensor sent or received.
        self._views: dict[tuple[int, torch.dtype, torch.Size], Tensor] = {}
        self._allocated = 0
        self._sequence = 0
        self._consumed = 0
        self._offset = 0
        self._announced = 0
        self.active = False
        """Whether this step's messages go through this channel (set by `begin_step`)."""
        self.ringer: Ringer | None = None
        """Sender: rung after each message when the receiver waits on a doorbell."""
        self.doorbell: Doorbell | None = None
        """Receiver: what a wait blocks on between checks, when ranks share cores."""

    # -- setup -------------------------------------------------------------------------------

    @classmethod
    def create(cls, directory: Path, name: str, capacity: int, token: int) -> ShmChannel:
        # Sparse: only the header is allocated now, data pages per step (`begin_step`).
        file = SharedFile.create(directory, name, _HEADER_BYTES + capacity, allocate=_HEADER_BYTES)
        channel = cls(file, capacity, is_sender=True)
        channel._header[_MAGIC] = token
        return channel

    @classmethod
    def open(cls, directory: Path, name: str, capacity: int, token: int) -> ShmChannel | None:
        """The receiver's side, or None when the file is not there or not the sender's
        (another machine, or another /dev/shm namespace on this one)."""
        file = SharedFile.open(directory, name, _HEADER_BYTES + capacity)
        if file is None:
            return None
        channel = cls(file, capacity, is_sender=False)
        if int(channel._header[_MAGIC]) != token:
            channel.close()
            return None
        return channel

    def unlink(self) -> None:
        """Remove the name; both mappings stay valid."""
        self._file.unlink()

    def close(self) -> None:
        for end in (self.ringer, self.doorbell):
            if end is not None:
                end.close()
        if not self._file.alive:
            return
        self._views.clear()
        self._words.release()
        self._bytes.release()
        del self._data, self._header
        self._file.close()

    # -- per step ----------------------------------------------------------------------------

    def begin_step(self, num_bytes: int) -> None:
        """Start a step that moves `num_bytes` (as laid out by `layout`) through this
        direction; the channel is active only if they fit."""
        self.active = num_bytes <= self.capacity
        self._announced = num_bytes
        self._offset = 0
        if self.active and self.is_sender and num_bytes > self._allocated:
            try:
                os.posix_fallocate(self._file.fd, _HEADER_BYTES, num_bytes)
            except OSError as error:
                raise PipelineError(
                    f"cannot allocate {num_bytes} bytes in {SHM_DIR} for the same-host channel "
                    f"{self.path.name} ({error}); free space there, lower shared_memory_bytes, "
                    f"or pass shared_memory=False to use the process group"
                ) from error
            self._allocated = num_bytes

    @property
    def sequence(self) -> int:
        """Messages sent (sender) or received (receiver) through this channel so far."""
        return self._sequence

    def all_consumed(self) -> bool:
        """Sender: whether the receiver took every message sent so far."""
        return int(self._header[_CONSUMED]) >= self._sequence

    def send(self, tensors: Sequence[Tensor]) -> None:
        """Copy `tensors` into the next slots and publish them (sender)."""
        if len(tensors) == 1:
            # A stage's usual boundary: one tensor, its size read once, no list of slots (the
            # path from a compute's end to this flag is on the critical path of 1F1B's hops).
            tensor = tensors[0]
            offset = (self._offset + _ALIGN - 1) // _ALIGN * _ALIGN
            size = tensor.nbytes
            end = offset + size
            if end > self._announced:
                raise self._overflow(end)
            if (  # `_copy_bytes`, inlined
                type(tensor) is Tensor
                and tensor.is_cpu
                and tensor.layout is _STRIDED
                and tensor.is_contiguous()
                and not tensor.is_neg()
                and not tensor.is_conj()
                and size <= BYTE_VIEW_MAX_BYTES
            ):
                _memmove(self._address + offset, tensor.data_ptr(), size)
            else:
                # Detached: a tensor that carries a graph must not put the channel's view in it.
                self._view(offset, tensor.dtype, tensor.shape).copy_(tensor.detach())
        else:
            offsets, end = _slots(tensors, self._offset)
            if end > self._announced:
                raise self._overflow(end)
            for tensor, offset in zip(tensors, offsets, strict=True):
                if not self._copy_bytes(tensor, offset, tensor.nbytes):
                    self._view(offset, tensor.dtype, tensor.shape).copy_(tensor.detach())
        self._offset = end
        self._sequence += 1
        # After the data (x86 keeps stores in order): a receiver that sees the count sees the data.
        self._words[_PUBLISHED] = self._sequence
        if self.ringer is not None:
            self.ringer.ring()

    def _copy_bytes(self, tensor: Tensor, offset: int, size: int) -> bool:
        """Copy a plain dense CPU `tensor` of `size` bytes to `offset` as bytes; False (nothing
        copied) for anything else, which takes a tensor copy (docs/decisions.md, "byte copies
        into the channel")."""
        if (
            type(tensor) is Tensor
            and tensor.is_cpu
            and tensor.layout is _STRIDED
            and tensor.is_contiguous()
            and not tensor.is_neg()
            and not tensor.is_conj()
            and size <= BYTE_VIEW_MAX_BYTES
        ):
            _memmove(self._address + offset, tensor.data_ptr(), size)
            return True
        return False

    def _overflow(self, end: int) -> PipelineError:
        return PipelineError(
            f"same-host channel {self.path.name}: a message ends at byte {end} but the step "
            f"announced {self._announced}; the boundary shapes disagree with the meta-device trace"
        )

    def _view(self, offset: int, dtype: torch.dtype, shape: torch.Size) -> Tensor:
        """The data region from `offset` as a tensor of `dtype` and `shape`."""
        key = (offset, dtype, shape)
        view = self._views.get(key)
        if view is None:
            size = shape.numel() * dtype.itemsize
            view = self._data[offset : offset + size].view(dtype).view(shape)
            if len(self._views) < _MAX_VIEWS:
                self._views[key] = view
        return view

    def ready(self, sequence: int) -> bool:
        """Receiver: whether message number `sequence` (1-based) has been published."""
        return bool(self._words[_PUBLISHED] >= sequence)

    def ready_check(self, sequence: int) -> Callable[[], bool]:
        """Receiver: `ready(sequence)` as one call with nothing to look up, for a wait's
        polling loop (each check's cost is latency added to the wake-up)."""
        words = self._words
        return lambda: words[_PUBLISHED] >= sequence  # type: ignore[no-any-return]

    def claim(self, buffers: Sequence[Tensor]) -> tuple[int, Sequence[int], int]:
        """Receiver: reserve the next message's slots; returns (sequence, offsets, end)."""
        if len(buffers) == 1:  # a stage's usual boundary: one tensor, no list of slots (as `send`)
            offsets: Sequence[int] = ((self._offset + _ALIGN - 1) // _ALIGN * _ALIGN,)
            end = offsets[0] + buffers[0].nbytes
        else:
            offsets, end = _slots(buffers, self._offset)
        if end > self._announced:
            raise PipelineError(
                f"same-host channel {self.path.name}: a receive ends at byte {end} but the step "
                f"announced {self._announced}; the boundary shapes disagree with the meta-device trace"
            )
        self._offset = end
        self._sequence += 1
        return self._sequence, offsets, end

    def read(self, sequence: int, buffers: Sequence[Tensor], offsets: Sequence[int]) -> None:
        """Receiver: copy a published message out and mark it consumed."""
        for buffer, offset in zip(buffers, offsets, strict=True):
            buffer.copy_(self._view(offset, buffer.dtype, buffer.shape))
        self._mark_consumed(sequence)

    def read_bytes(self, sequence: int, targets: Sequence[memoryview], offsets: Sequence[int]) -> None:
        """Receiver: `read` into buffers given as byte views of their memory (`byte_view`), one
        per buffer of the claim, each exactly that buffer's bytes."""
        data = self._bytes
        if len(targets) == 1:  # one tensor: no iterator between the flag and the consumer's compute
            target, offset = targets[0], offsets[0]
            target[:] = data[offset : offset + len(target)]
        else:
            for target, offset in zip(targets, offsets, strict=True):
                target[:] = data[offset : offset + len(target)]
        if sequence > self._consumed:  # `_mark_consumed`, inlined: once per received message
            self._consumed = sequence
            self._words[_CONSUMED] = sequence

    def _mark_consumed(self, sequence: int) -> None:
        # Messages of one channel may be consumed out of posting order (two stages of the
        # receiver fed by one sender); `consumed` is the highest taken, which is the
        # step's last message once the step is done. Stored after the copy out, so the
        # sender (which waits for it before its next step) never rewrites a slot being read.
        if sequence > self._consumed:
            self._consumed = sequence
            self._words[_CONSUMED] = sequence
