"""Point-to-point transfers between stages and the few collectives of a step.

Every operation is asynchronous and every wait goes through the `Watchdog`, so no
call here can block past `timeout_s` (see docs/decisions.md, "bounded waits").

Design notes: docs/decisions.md, "CUDA streams".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from pipefold.errors import PipelineError
from pipefold.runtime.failure import Watchdog
from pipefold.runtime.processes.cores import processes_on_host, ranks_share_cores
from pipefold.runtime.progress import Progress
from pipefold.runtime.transport.doorbell import Doorbell, Ringer
from pipefold.runtime.transport.shm import SHM_DIR, ShmChannel, new_token, shm_name, shm_supported
from pipefold.runtime.transport.shm_exchange import PROGRESS_STRIDE, ShmExchange

__all__ = ["P2P", "Collectives", "LastPickle", "Transfer"]

logger = logging.getLogger(__name__)


class Transfer(Protocol):
    """A started send or a posted receive; `wait` returns once it is complete."""

    def wait(self, watchdog: Watchdog, what: str) -> None: ...

    def done(self) -> bool:
        """Complete already (a send no longer reads its tensors); never blocks."""
        ...


@dataclass(eq=False)
class _WorkTransfer:
    works: list[dist.Work]
    peer: int

    def wait(self, watchdog: Watchdog, what: str) -> None:
        for work in self.works:
            watchdog.wait(work, what=what, peer=self.peer)

    def done(self) -> bool:
        return all(work.is_completed() for work in self.works)


class _Sent:
    """A shared-memory send: complete when `send` returns."""

    def wait(self, watchdog: Watchdog, what: str) -> None:
        return None

    def done(self) -> bool:
        return True


_SENT = _Sent()


@dataclass(eq=False, slots=True)
class _ShmReceive:
    """A posted shared-memory receive: its slots are claimed, the copy out happens in `wait`.
    Slotted: one is made per message."""

    channel: ShmChannel
    sequence: int
    buffers: Sequence[Tensor]
    offsets: Sequence[int]
    peer: int
    peer_alive: Callable[[], bool] | None
    views: Sequence[memoryview] | None = None
    """The buffers' bytes (`shm.byte_view`): the copy out is then a slice assignment."""

    def done(self) -> bool:
        return False  # the copy out happens in `wait`

    def wait(self, watchdog: Watchdog, what: str) -> None:
        channel, sequence = self.channel, self.sequence
        if not channel.ready(sequence):
            doorbell = channel.doorbell
            watchdog.wait_until(
                channel.ready_check(sequence),
                what=what,
                peer=self.peer,
                peer_alive=self.peer_alive,
                block=None if doorbell is None else doorbell.wait,
            )
        if self.views is not None:
            channel.read_bytes(sequence, self.views, self.offsets)
        else:
            channel.read(sequence, self.buffers, self.offsets)


class P2P:
    """Non-blocking sends and receives of tensor tuples between ranks of one group.

    `ranks` maps the pipeline's rank numbers to global ranks (torch.distributed
    addresses peers by global rank even inside a subgroup). Between ranks on one host
    (CPU only) `connect_same_host` adds shared-memory channels that carry a step's
    boundary tensors when they fit (see docs/decisions.md, "shared-memory channels");
    everything else goes through the process group.
    """

    def __init__(self, group: dist.ProcessGroup, ranks: Sequence[int], device: torch.device) -> None:
        self._group = group
        self._global = tuple(ranks)
        self._comm_stream = (
            torch.cuda.Stream(device) if device.type == "cuda" else None  # type: ignore[no-untyped-call]
        )
        self.orders_streams = self._comm_stream is not None
        """Whether `after_recv` has work to do (a device with a communication stream)."""
        self._send_channels: dict[int, ShmChannel] = {}
        self._recv_channels: dict[int, ShmChannel] = {}
        self._peer_alive: dict[int, Callable[[], bool]] = {}

    @property
    def doorbell_peers(self) -> tuple[int, ...]:
        """Peers whose messages this rank waits for on a doorbell (docs/decisions.md, "doorbells")."""
        return tuple(sorted(p for p, c in self._recv_channels.items() if c.doorbell is not None))

    @property
    def same_host_peers(self) -> tuple[int, ...]:
        """Peers this rank exchanges boundary tensors with through shared memory."""
        return tuple(sorted(set(self._send_channels) | set(self._recv_channels)))

    def connect_same_host(
        self,
        collectives: Collectives,
        *,
        rank: int,
        send_peers: Sequence[int],
        recv_peers: Sequence[int],
        capacity: int,
    ) -> None:
        """Open shared-memory channels to the peers on this host (every rank calls this).

        Three small all-gathers: who is where, which channel files were created, which
        were opened; a channel is used only when both of its ends hold it.
        """
        token = new_token()
        me = (socket.gethostname(), os.getpid(), token, self._comm_stream is None and shm_supported())
        info = collectives.all_gather_object(me, what="same-host handshake")

        def reachable(peer: int) -> bool:
            return bool(me[3] and info[peer][3] and info[peer][0] == me[0])

        # Ranks that share cores wait on doorbells instead of sleeping polls (docs/decisions.md, "doorbells").
        bells = ranks_share_cores(processes_on_host(sum(1 for entry in info if entry[0] == me[0])))
        created: dict[int, ShmChannel] = {}
        for peer in sorted(set(send_peers)):
            if reachable(peer):
                try:
                    name = _channel_name(token, rank, peer)
                    created[peer] = ShmChannel.create(SHM_DIR, name, capacity, token)
                except OSError as error:
                    logger.info("no shared-memory channel to rank %d (%s): process group", peer, error)
        doorbells: dict[int, Doorbell] = {}
        for peer in sorted(set(recv_peers)) if bells else ():
            if reachable(peer):
                try:
                    doorbells[peer] = Doorbell.create(SHM_DIR, _channel_name(token, peer, rank) + "-bell")
                except OSError as error:
                    logger.info("no doorbell from rank %d (%s): polling", peer, error)
        announced = collectives.all_gather_object(
            (sorted(created), sorted(doorbells)), what="same-host handshake"
        )
        opened: dict[int, ShmChannel] = {}
        for peer in sorted(set(recv_peers)):
            if rank in announced[peer][0]:
                peer_token = int(info[peer][2])
                name = _channel_name(peer_token, peer, rank)
                channel = ShmChannel.open(SHM_DIR, name, capacity, peer_token)
                if channel is not None:
                    # Both ends have it mapped now: drop the name at once, so a rank killed
                    # from here on leaves no file behind (the sender unlinks it too, later).
                    channel.unlink()
                    opened[peer] = channel
        ringers: dict[int, Ringer] = {}
        for peer in created:
            if rank in announced[peer][1]:
                ringer = Ringer.open(SHM_DIR, _channel_name(int(info[peer][2]), rank, peer) + "-bell")
                if ringer is not None:
                    ringers[peer] = ringer
        accepted = collectives.all_gather_object(
            (sorted(opened), sorted(ringers)), what="same-host handshake"
        )
        for doorbell in doorbells.values():
            doorbell.unlink()
        for peer, channel in created.items():
            channel.unlink()
            if rank in accepted[peer][0]:
                self._send_channels[peer] = channel
                # Ring only where the receiver keeps its doorbell (it does when it opened the channel).
                channel.ringer = ringers.get(peer)
            else:
                channel.close()
        for peer, doorbell in doorbells.items():
            if peer in opened and rank in accepted[peer][1]:
                opened[peer].doorbell = doorbell
            else:
                doorbell.close()
        self._recv_channels = opened
        for peer in self.same_host_peers:
            pid = int(info[peer][1])
            # Another PID namespace can share /dev/shm; there the pid means nothing and
            # only the timeout and the failure board detect a dead peer.
            if _process_alive(pid):
                self._peer_alive[peer] = functools.partial(_process_alive, pid)

    def close(self) -> None:
        for channel in (*self._send_channels.values(), *self._recv_channels.values()):
            channel.close()
        self._send_channels = {}
        self._recv_channels = {}

    def begin_step(
        self, send_bytes: Mapping[int, int], recv_bytes: Mapping[int, int], watchdog: Watchdog
    ) -> None:
        """Announce this step's traffic per peer (bytes as laid out by `shm.layout`); both
        ends of a channel compute the same totals, so they agree on whether it is used."""
        for peer, channel in self._send_channels.items():
            if not channel.all_consumed():
                watchdog.wait_until(
                    channel.all_consumed,
                    what="start of step (previous step's messages)",
                    peer=peer,
                    peer_alive=self._peer_alive.get(peer),
                )
            channel.begin_step(send_bytes.get(peer, 0))
        for peer, channel in self._recv_channels.items():
            channel.begin_step(recv_bytes.get(peer, 0))

    @contextlib.contextmanager
    def _on_comm_stream(self) -> Iterator[None]:
        if self._comm_stream is None:
            yield
            return
        self._comm_stream.wait_stream(torch.cuda.current_stream(self._comm_stream.device))
        with torch.cuda.stream(self._comm_stream):
            yield

    def sender(self, peer: int) -> Callable[[Sequence[Tensor]], Transfer | None]:
        """`send` to `peer` resolved for this step (call after `begin_step`): a function of the
        tensors returning the transfer, or None where the send is complete when it returns (a
        shared-memory send has copied the tensors). The executor resolves one per peer per step,
        so a message pays no channel lookup."""
        channel = self._send_channels.get(peer)
        if channel is not None and channel.active:
            return channel.send
        return functools.partial(self.send_direct, peer=peer)

    def copies_on_send(self, peer: int) -> bool:
        """Whether this step's send to `peer` copies the tensors before it returns and keeps no
        reference (shared memory): the caller may then pass tensors that carry a graph."""
        channel = self._send_channels.get(peer)
        return channel is not None and channel.active

    def receiver(self, peer: int) -> Callable[[Sequence[Tensor], Sequence[memoryview] | None], Transfer]:
        """`recv` from `peer` resolved for this step (call after `begin_step`), as `sender`: a
        function of (buffers, their byte views or None)."""
        channel = self._recv_channels.get(peer)
        if channel is not None and channel.active:
            return functools.partial(_shm_receive, channel, peer, self._peer_alive.get(peer))
        return functools.partial(self._recv_direct_of, peer)

    def _recv_direct_of(
        self, peer: int, buffers: Sequence[Tensor], views: Sequence[memoryview] | None
    ) -> Transfer:
        return self.recv_direct(buffers, peer)

    def send(self, tensors: Sequence[Tensor], peer: int) -> Transfer:
        """Start sending `tensors` (in order) to pipeline rank `peer` (a step's message)."""
        channel = self._send_channels.get(peer)
        if channel is not None and channel.active:
            channel.send(tensors)
            return _SENT
        return self.send_direct(tensors, peer)

    def recv(
        self, buffers: Sequence[Tensor], peer: int, views: Sequence[memoryview] | None = None
    ) -> Transfer:
        """Post receives into `buffers` (in order) from pipeline rank `peer` (a step's message).

        `views`, where given, are the buffers' bytes (`shm.byte_view`, one per buffer, kept
        alive with them by the caller): a shared-memory receive then copies into them directly.
        """
        channel = self._recv_channels.get(peer)
        if channel is not None and channel.active:
            return _shm_receive(channel, peer, self._peer_alive.get(peer), buffers, views)
        return self.recv_direct(buffers, peer)

    def send_direct(self, tensors: Sequence[Tensor], peer: int, *, tag: int = 0) -> Transfer:
        """`send` through the process group, outside a step's announced traffic; a message sent
        in the middle of a step's own direct messages takes its own `tag` (gloo matches a
        receive to the first message of its tag; NCCL ignores tags)."""
        works = []
        with self._on_comm_stream():
            for tensor in tensors:
                if self._comm_stream is not None:
                    tensor.record_stream(self._comm_stream)
                work = dist.isend(tensor, dst=self._global[peer], group=self._group, tag=tag)
                if work is None:  # only when this rank is outside the group, which the Pipeline rules out
                    raise PipelineError(
                        f"isend to rank {peer} returned no work; this rank is not in the group"
                    )
                works.append(work)
        return _WorkTransfer(works, peer)

    def recv_direct(self, buffers: Sequence[Tensor], peer: int, *, tag: int = 0) -> Transfer:
        """`recv` through the process group, outside a step's announced traffic (see `send_direct`)."""
        works = []
        with self._on_comm_stream():
            for buffer in buffers:
                work = dist.irecv(buffer, src=self._global[peer], group=self._group, tag=tag)
                if work is None:
                    raise PipelineError(
                        f"irecv from rank {peer} returned no work; this rank is not in the group"
                    )
                works.append(work)
        return _WorkTransfer(works, peer)

    def after_recv(self) -> None:
        """Order the compute stream after completed receives (no-op on CPU)."""
        if self._comm_stream is not None:
            torch.cuda.current_stream(self._comm_stream.device).wait_stream(self._comm_stream)


def _shm_receive(
    channel: ShmChannel,
    peer: int,
    peer_alive: Callable[[], bool] | None,
    buffers: Sequence[Tensor],
    views: Sequence[memoryview] | None,
) -> Transfer:
    """Claim the next message's slots of `channel` for `buffers`: the posted receive."""
    sequence, offsets, _ = channel.claim(buffers)
    return _ShmReceive(channel, sequence, buffers, offsets, peer, peer_alive, views)


def _channel_name(token: int, sender: int, receiver: int) -> str:
    return shm_name(f"{token:x}-{sender}-{receiver}")


def _process_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


class LastPickle:
    """`pickle.dumps` and `pickle.loads` of values nobody changes, reusing the last result of
    each: a value equal to the last one dumped gets its payload again, a payload equal to the
    last one loaded its value (the same object). For small values of plain types whose `==`
    compares contents, sent again and again (a step's batch description)."""

    def __init__(self) -> None:
        self._dumped: tuple[Any, bytes] | None = None
        self._loaded: tuple[bytes, Any] | None = None

    def dumps(self, value: Any) -> bytes:
        last = self._dumped
        if last is not None and type(last[0]) is type(value) and last[0] == value:
            return last[1]
        payload = pickle.dumps(value)
        self._dumped = (value, payload)
        return payload

    def loads(self, payload: bytes) -> Any:
        last = self._loaded
        if last is not None and last[0] == payload:
            return last[1]
        value = pickle.loads(payload)
        self._loaded = (payload, value)
        return value


class Collectives:
    """The step's collectives (shape broadcast, loss reduction, timeline gather), all bounded.

    With `connect_same_host` (CPU, every rank on one host) the step's broadcast and
    all-gather go through shared memory (see docs/decisions.md, "shared-memory exchange");
    everything else, and whatever does not fit, through the group.
    """

    def __init__(
        self,
        group: dist.ProcessGroup,
        ranks: Sequence[int],
        device: torch.device,
        watchdog: Watchdog,
    ) -> None:
        self._group = group
        self._global = tuple(ranks)
        self._device = device
        self._watchdog = watchdog
        self._exchange: ShmExchange | None = None
        # This process's rank in `group`, read once (a call into c10d each time otherwise, on
        # the step's start: `broadcast_object` of the batch's description).
        self._rank = dist.get_rank(group)
        self._immutable = LastPickle()
        """`broadcast_object(..., immutable=True)`'s pickling, which reuses the last one."""
        self.progress = Progress(None, rank=self._rank, num_ranks=len(self._global))
        """Where each rank is (pipefold/runtime/progress.py); shared when the exchange is."""

    @property
    def uses_shared_memory(self) -> bool:
        """Whether the step's broadcast and all-gather go through the shared-memory exchange."""
        return self._exchange is not None

    @property
    def exchange(self) -> ShmExchange | None:
        """The step's shared-memory exchange (every rank on this host, CPU), else None; its
        doorbell and ringers serve other exchanges among these ranks too (`shm_owners`)."""
        return self._exchange

    @property
    def uses_doorbells(self) -> bool:
        """Whether the exchange's waits block on doorbells."""
        return self._exchange is not None and self._exchange.doorbell is not None

    def connect_same_host(self, *, capacity: int) -> None:
        """Set up the shared-memory exchange if every rank is on this host (every rank calls this)."""
        rank = dist.get_rank(self._group)
        num_ranks = len(self._global)
        token = new_token()
        usable = self._device.type == "cpu" and shm_supported()
        me = (socket.gethostname(), os.getpid(), token, usable)
        info = self.all_gather_object(me, what="same-host exchange handshake")
        if num_ranks < 2 or not all(entry[3] and entry[0] == me[0] for entry in info):
            return
        name = shm_name(f"{int(info[0][2]):x}-exchange")
        exchange: ShmExchange | None = None
        if rank == 0:
            try:
                exchange = ShmExchange.create(
                    SHM_DIR, name, num_ranks=num_ranks, capacity=capacity, token=int(info[0][2])
                )
            except OSError as error:
                logger.info("no shared-memory exchange (%s): process group", error)
        # Ranks that share cores block on doorbells between checks (docs/decisions.md, "doorbells").
        doorbell: Doorbell | None = None
        if ranks_share_cores(processes_on_host(num_ranks)):
            try:
                doorbell = Doorbell.create(SHM_DIR, f"{name}-bell-{rank}")
            except OSError as error:
                logger.info("no exchange doorbell (%s): polling", error)
        created = self.all_gather_object(
            (exchange is not None, doorbell is not None), what="same-host exchange handshake"
        )
        if created[0][0] and rank != 0:
            exchange = ShmExchange.open(
                SHM_DIR, name, num_ranks=num_ranks, rank=rank, capacity=capacity, token=int(info[0][2])
            )
        ringers = []
        if all(bell for _, bell in created):
            for other in range(num_ranks):
                if other != rank:
                    ringer = Ringer.open(SHM_DIR, f"{name}-bell-{other}")
                    if ringer is not None:
                        ringers.append(ringer)
        opened = self.all_gather_object(
            (exchange is not None, len(ringers) == num_ranks - 1), what="same-host exchange handshake"
        )
        if rank == 0 and exchange is not None:
            exchange.unlink()
        if doorbell is not None:
            doorbell.unlink()
        if not all(ok for ok, _ in opened) or exchange is None:
            if exchange is not None:
                exchange.close()
            for end in (doorbell, *ringers):
                if end is not None:
                    end.close()
            return
        if doorbell is not None and all(rung for _, rung in opened):
            exchange.doorbell, exchange.ringers = doorbell, ringers
        else:
            for end in (doorbell, *ringers):
                if end is not None:
                    end.close()
        pids = [int(entry[1]) for r, entry in enumerate(info) if r != rank]
        # Another PID namespace can share /dev/shm; only trust pids that exist here.
        if all(_process_alive(pid) for pid in pids):
            exchange.peer_alive = lambda: all(_process_alive(pid) for pid in pids)
            self.progress = Progress(
                exchange.progress_slots(), rank=rank, num_ranks=num_ranks, stride=PROGRESS_STRIDE,
                pids=[int(entry[1]) for entry in info],
            )
        self._exchange = exchange

    def close(self) -> None:
        self.progress.release()
        if self._exchange is not None:
            self._exchange.close()
            self._exchange = None

    def _wait(self, work: dist.Work | None, what: str) -> None:
        if work is not None:
            self._watchdog.wait(work, what=what, peer=None)

    def all_reduce_sum(self, tensor: Tensor, *, what: str) -> None:
        """Sum `tensor` in place over the pipeline's group."""
        if self._exchange is not None:
            shared = self._exchange.all_gather(tensor, watchdog=self._watchdog, what=what)
            if shared is not None:
                # Rank order on every rank, so every rank gets the same sum.
                total = shared[0].clone()
                for part in shared[1:]:
                    total += part
                tensor.copy_(total)
                return
        work = dist.all_reduce(tensor, group=self._group, async_op=True)
        self._wait(work, what)

    def all_gather(self, tensor: Tensor, *, what: str) -> list[Tensor]:
        """Every rank's `tensor` (same shape and dtype everywhere), in rank order."""
        if self._exchange is not None:
            shared = self._exchange.all_gather(tensor, watchdog=self._watchdog, what=what)
            if shared is not None:
                return shared
        gathered = [torch.empty_like(tensor) for _ in self._global]
        self._wait(dist.all_gather(gathered, tensor, group=self._group, async_op=True), what)
        return gathered

    def broadcast_object(self, value: Any, *, src: int, what: str, immutable: bool = False) -> Any:
        """`value` from pipeline rank `src` on every rank (pickled; small objects only).

        `immutable`: the value (of plain types whose `==` compares contents) is never changed
        by the caller nor by the receivers, so a value equal to the last one sent reuses its
        pickle, and a payload equal to the last one received returns the last value (the
        batch's description each step: pickling it and unpickling it took 30-50 µs each on the
        step's start, on a rank every other rank waits for)."""
        is_src = self._rank == src
        payload = b""
        if is_src:
            payload = self._immutable.dumps(value) if immutable else pickle.dumps(value)
        if self._exchange is not None:
            shared = self._exchange.broadcast(
                payload if is_src else None, src=src, watchdog=self._watchdog, what=what
            )
            if shared is not None:
                return value if is_src else self._unpickled(shared, immutable)
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self._device)
        self._wait(dist.broadcast(size, src=self._global[src], group=self._group, async_op=True), what)
        buffer = self._bytes_tensor(payload, int(size.item()))
        self._wait(dist.broadcast(buffer, src=self._global[src], group=self._group, async_op=True), what)
        return value if is_src else self._unpickled(buffer.cpu().numpy().tobytes(), immutable)

    def _unpickled(self, payload: bytes, immutable: bool) -> Any:
        return self._immutable.loads(payload) if immutable else pickle.loads(payload)

    def all_gather_object(self, value: Any, *, what: str) -> list[Any]:
        """Every rank's `value`, in rank order."""
        payload = pickle.dumps(value)
        num_ranks = len(self._global)
        size = torch.tensor([len(payload)], dtype=torch.int64, device=self._device)
        sizes = [torch.zeros_like(size) for _ in range(num_ranks)]
        self._wait(dist.all_gather(sizes, size, group=self._group, async_op=True), what)
        lengths = [int(s.item()) for s in sizes]
        longest = max(lengths)
        mine = self._bytes_tensor(payload, longest)
        gathered = [torch.empty(longest, dtype=torch.uint8, device=self._device) for _ in range(num_ranks)]
        self._wait(dist.all_gather(gathered, mine, group=self._group, async_op=True), what)
        return [
            pickle.loads(chunk[:length].cpu().numpy().tobytes())
            for chunk, length in zip(gathered, lengths, strict=True)
        ]

    def _bytes_tensor(self, payload: bytes, length: int) -> Tensor:
        buffer = torch.zeros(length, dtype=torch.uint8)
        if payload:
            buffer[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        return buffer.to(self._device)
