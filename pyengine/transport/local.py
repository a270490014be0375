"""N virtual ranks in one process on one device (CUDA or CPU), one Python thread per rank.

``LocalTransport.create(world_size, device, timeout_s)`` returns one transport per
virtual rank; drive each from its own thread. Ranks meet through a shared hub:

* send/recv: a FIFO mailbox per (src, dst). Whichever side arrives second
  performs the copy on the *receiver's* comm stream after waiting on both sides'
  "ready" events, then records a completion event that both handles wait on
  (so the sender may not overwrite its buffer before the copy has run).
* collectives: a rendezvous per (group, n-th call on that group); the last
  member to arrive sums (in group order, in the tensors' dtype) on its own comm
  stream and writes every member's result.

On CPU the same code runs with events as no-ops, so CI exercises the logic.
``Handle.wait`` blocks the host until the peer(s) have *issued* the matching op
(up to the timeout, then TransportError naming the missing peer(s)); on CUDA it
then makes the caller's current stream wait on the completion event.
``Handle.synchronize`` also waits (host, bounded) for that event.

``abort()`` on a virtual rank fails every pending op that involves it, on every
rank (their waits raise at once, naming the aborted rank), and every later op
that involves it. ``group()`` issues ops at once (nothing to fuse), for parity.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from pyengine.transport.base import (
    DEFAULT_TIMEOUT_S,
    TransportError,
    as_tensor,
    check_contiguous,
    check_group,
    check_peer,
    describe,
    scatter_chunk,
)

__all__ = ["LocalTransport"]


@dataclass(eq=False)
class _Completion:
    """Set once: ``flag`` fires when the op has been performed (or failed); ``event`` is its
    CUDA completion event (None on CPU)."""

    flag: threading.Event = field(default_factory=threading.Event)
    event: Any = None
    error: str | None = None
    start: Any = None  # CUDA timing event recorded just before the copy/sum runs

    def finish(self, event: Any = None, error: str | None = None, start: Any = None) -> None:
        self.event, self.error, self.start = event, error, start
        self.flag.set()


@dataclass(eq=False)
class _Pending:
    """One side of a point-to-point message or one member's part of a collective."""

    rank: int
    tensor: torch.Tensor | None
    ready: Any  # event recorded on the issuer's current stream (None on CPU)
    stream: Any  # the issuer's comm stream (None on CPU)
    out: torch.Tensor | None = None
    root: int | None = None


@dataclass(eq=False)
class _Rendezvous:
    op: str
    group: tuple[int, ...]
    parts: dict[int, _Pending] = field(default_factory=dict)
    done: _Completion = field(default_factory=_Completion)


class _Hub:
    """State shared by the virtual ranks of one LocalTransport.create() call."""

    def __init__(self, world_size: int, device: torch.device, timeout_s: float):
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self.cuda = device.type == "cuda"
        self.lock = threading.Lock()
        self.sends: dict[tuple[int, int], deque[tuple[_Pending, _Completion]]] = {}
        self.recvs: dict[tuple[int, int], deque[tuple[_Pending, _Completion]]] = {}
        self.rendezvous: dict[tuple[tuple[int, ...], int], _Rendezvous] = {}
        self.calls: dict[tuple[int, tuple[int, ...]], int] = {}
        self.aborted: set[int] = set()  # virtual ranks whose transport was aborted

    @staticmethod
    def aborted_error(ranks: set[int]) -> str:
        return f"rank(s) {sorted(ranks)} aborted their transport"

    def abort(self, rank: int) -> None:
        """Fails every pending op involving ``rank`` (on every rank) and, from now on, every
        new one."""
        error = self.aborted_error({rank})
        doomed: list[_Completion] = []
        with self.lock:
            self.aborted.add(rank)
            for table in (self.sends, self.recvs):
                for (src, dst), queue in table.items():
                    if rank in (src, dst):
                        doomed.extend(done for _, done in queue)
                        queue.clear()
            for key, rv in list(self.rendezvous.items()):
                if rank in rv.group:
                    doomed.append(rv.done)
                    del self.rendezvous[key]
        for done in doomed:
            if not done.flag.is_set():
                done.finish(error=error)

    # -- events ----------------------------------------------------------------------------
    def record(self, stream: Any) -> Any:
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)  # also times the op for the runtime
        event.record(stream)
        return event

    def on_stream(self, stream: Any):
        return torch.cuda.stream(stream) if self.cuda else _NullContext()

    # -- point to point --------------------------------------------------------------------
    def post(self, kind: str, src: int, dst: int, part: _Pending) -> _Completion:
        """kind "send" (part from src) or "recv" (part owned by dst); matches FIFO per pair."""
        done = _Completion()
        key = (src, dst)
        with self.lock:
            gone = self.aborted & {src, dst}
            if gone:
                done.finish(error=self.aborted_error(gone))
                return done
            mine, theirs = (self.sends, self.recvs) if kind == "send" else (self.recvs, self.sends)
            waiting = theirs.get(key)
            if not waiting:
                mine.setdefault(key, deque()).append((part, done))
                return done
            other, other_done = waiting.popleft()
        if kind == "send":
            self._deliver(part, done, other, other_done)
        else:
            self._deliver(other, other_done, part, done)
        return done

    def _deliver(self, msg: _Pending, msg_done: _Completion, slot: _Pending,
                 slot_done: _Completion) -> None:
        src, dst = msg.tensor, slot.tensor
        if src.numel() != dst.numel() or src.dtype != dst.dtype:
            error = (f"size/dtype mismatch: rank {msg.rank} sent {src.numel()} x {src.dtype}, "
                     f"rank {slot.rank} expects {dst.numel()} x {dst.dtype}")
            msg_done.finish(error=error)
            slot_done.finish(error=error)
            return
        event = None
        try:
            with self.on_stream(slot.stream):
                if self.cuda:
                    slot.stream.wait_event(msg.ready)
                    slot.stream.wait_event(slot.ready)
                    src.record_stream(slot.stream)
                    dst.record_stream(slot.stream)
                start = self.record(slot.stream)
                dst.view(-1).copy_(src.view(-1))
                event = self.record(slot.stream)
        except RuntimeError as exc:
            msg_done.finish(error=f"copy failed: {exc}")
            slot_done.finish(error=f"copy failed: {exc}")
            return
        msg_done.finish(event, start=start)
        slot_done.finish(event, start=start)

    # -- collectives -----------------------------------------------------------------------
    def join(self, op: str, group: tuple[int, ...], part: _Pending,
             execute: Callable[[_Rendezvous, Any], None]) -> _Rendezvous:
        with self.lock:
            seq = self.calls.get((part.rank, group), 0)
            self.calls[(part.rank, group)] = seq + 1
            gone = self.aborted & set(group)
            if gone:
                rv = _Rendezvous(op, group)
                rv.done.finish(error=self.aborted_error(gone))
                return rv
            key = (group, seq)
            rv = self.rendezvous.setdefault(key, _Rendezvous(op, group))
            if rv.op != op:
                first = next(iter(rv.parts), None)
                rv.done.finish(error=f"mismatched collectives on group {group} (call #{seq}): "
                                     f"rank {first} issued {rv.op}, rank {part.rank} issued {op}")
            rv.parts[part.rank] = part
            last = len(rv.parts) == len(group)
            if last:
                del self.rendezvous[key]
        if last and not rv.done.flag.is_set():
            try:
                with self.on_stream(part.stream):
                    if self.cuda:
                        for p in rv.parts.values():
                            part.stream.wait_event(p.ready)
                            for t in (p.tensor, p.out):
                                if t is not None:
                                    t.record_stream(part.stream)
                    start = self.record(part.stream)
                    execute(rv, part.stream)
                    event = self.record(part.stream)
            except (RuntimeError, TransportError) as exc:
                rv.done.finish(error=str(exc))
            else:
                rv.done.finish(event, start=start)
        return rv

    def missing(self, rv: _Rendezvous) -> list[int]:
        with self.lock:
            return [r for r in rv.group if r not in rv.parts]


class _NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


class _LocalHandle:
    def __init__(self, hub: _Hub, done: _Completion, what: str, pending: Callable[[], str]):
        self._hub = hub
        self._done = done
        self._what = what
        self._pending = pending  # describes who we are waiting for (on timeout)

    def wait(self, timeout_s: float | None = None) -> None:
        limit = self._hub.timeout_s if timeout_s is None else timeout_s
        if not self._done.flag.wait(limit):
            raise TransportError(f"{self._what} timed out after {limit:g} s: {self._pending()}")
        if self._done.error is not None:
            raise TransportError(f"{self._what} failed: {self._done.error}")
        if self._done.event is not None:
            torch.cuda.current_stream(self._hub.device).wait_event(self._done.event)

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Blocks the host until the peer(s) issued the op and its copy/sum has run; the
        same bound covers both."""
        limit = self._hub.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + limit
        if not self._done.flag.wait(limit):
            raise TransportError(f"{self._what} timed out after {limit:g} s: {self._pending()}")
        if self._done.error is not None:
            raise TransportError(f"{self._what} failed: {self._done.error}")
        event = self._done.event
        while event is not None and not event.query():
            if time.monotonic() > deadline:
                raise TransportError(f"{self._what} timed out after {limit:g} s: its copy/sum "
                                     "was issued but did not finish on the device")
            time.sleep(50e-6)

    def is_completed(self) -> bool:
        if not self._done.flag.is_set() or self._done.error is not None:
            return False
        return self._done.event is None or self._done.event.query()

    @property
    def events(self) -> tuple[Any, Any] | None:
        """(start, end) CUDA timing events of the copy/sum once it has been issued (None on CPU)."""
        d = self._done
        return (d.start, d.event) if d.flag.is_set() and d.start is not None else None


def _sum_in_order(tensors: list[torch.Tensor]) -> torch.Tensor:
    acc = tensors[0].clone()
    for t in tensors[1:]:
        acc.add_(t)
    return acc


def _same_shapes(rv: _Rendezvous, attr: str) -> None:
    shapes = {r: (tuple(getattr(p, attr).shape), getattr(p, attr).dtype) for r, p in rv.parts.items()}
    if len(set(shapes.values())) != 1:
        raise TransportError(f"{rv.op} on group {rv.group}: members disagree on shape/dtype {shapes}")


def _exec_all_reduce(rv: _Rendezvous, stream: Any) -> None:
    _same_shapes(rv, "tensor")
    acc = _sum_in_order([rv.parts[r].tensor for r in rv.group])
    for r in rv.group:
        rv.parts[r].tensor.copy_(acc)


def _exec_reduce_scatter(rv: _Rendezvous, stream: Any) -> None:
    _same_shapes(rv, "tensor")
    chunks = _sum_in_order([rv.parts[r].tensor for r in rv.group]).chunk(len(rv.group), dim=0)
    for i, r in enumerate(rv.group):
        rv.parts[r].out.copy_(chunks[i])


def _exec_broadcast(rv: _Rendezvous, stream: Any) -> None:
    _same_shapes(rv, "tensor")
    roots = {p.root for p in rv.parts.values()}
    if len(roots) != 1:
        raise TransportError(f"broadcast on group {rv.group}: members disagree on the root {roots}")
    root = roots.pop()
    src = rv.parts[root].tensor
    for r in rv.group:
        if r != root:
            rv.parts[r].tensor.copy_(src)


def _exec_barrier(rv: _Rendezvous, stream: Any) -> None:
    return None


class LocalTransport:
    """One virtual rank of an in-process group; see the module docstring."""

    name = "local"

    @classmethod
    def create(cls, world_size: int, device: torch.device | str = "cpu",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[LocalTransport]:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if world_size < 1:
            raise TransportError(f"local transport: world_size must be >= 1, got {world_size}")
        hub = _Hub(world_size, device, float(timeout_s))
        return [cls(hub, rank) for rank in range(world_size)]

    def __init__(self, hub: _Hub, rank: int):
        self._hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.device = hub.device
        self.timeout_s = hub.timeout_s
        self.stream = torch.cuda.Stream(hub.device) if hub.cuda else None
        self._closed = False
        self.aborted = False

    # -- helpers ---------------------------------------------------------------------------
    def _tensor(self, obj: Any, what: str) -> torch.Tensor:
        if self._closed:
            raise TransportError(f"{what}: the transport is "
                                 f"{'aborted' if self.aborted else 'closed'}")
        tensor = as_tensor(obj)
        if tensor.device != self.device:
            raise TransportError(f"{what}: tensor on {tensor.device}, transport on {self.device}")
        check_contiguous(tensor, what)
        return tensor

    def _part(self, tensor: torch.Tensor | None, **extra: Any) -> _Pending:
        ready = self._hub.record(torch.cuda.current_stream(self.device)) if self._hub.cuda else None
        return _Pending(self.rank, tensor, ready, self.stream, **extra)

    def _p2p(self, kind: str, obj: Any, peer: int, name: str) -> _LocalHandle:
        what = describe("local", kind, name, self.rank, peer=peer)
        check_peer(peer, self.world_size, what)
        part = self._part(self._tensor(obj, what))
        src, dst = (self.rank, peer) if kind == "send" else (peer, self.rank)
        done = self._hub.post(kind, src, dst, part)
        other = "recv" if kind == "send" else "send"
        return _LocalHandle(self._hub, done, what,
                            lambda: f"peer {peer} never issued the matching {other}")

    def _collective(self, op: str, group: tuple[int, ...], name: str, execute: Callable,
                    tensor: torch.Tensor | None, **extra: Any) -> _LocalHandle:
        what = describe("local", op, name, self.rank, peer=extra.get("root"), group=group)
        group = check_group(group, self.rank, self.world_size, what)
        rv = self._hub.join(op, group, self._part(tensor, **extra), execute)
        return _LocalHandle(self._hub, rv.done, what,
                            lambda: f"rank(s) {self._hub.missing(rv)} never issued it")

    # -- protocol --------------------------------------------------------------------------
    def send(self, tensor: Any, peer: int, *, name: str = "") -> _LocalHandle:
        return self._p2p("send", tensor, peer, name)

    def recv(self, tensor: Any, peer: int, *, name: str = "") -> _LocalHandle:
        return self._p2p("recv", tensor, peer, name)

    def all_reduce(self, tensor: Any, group: tuple[int, ...], *, name: str = "") -> _LocalHandle:
        what = describe("local", "all_reduce", name, self.rank, group=group)
        return self._collective("all_reduce", group, name, _exec_all_reduce,
                                self._tensor(tensor, what))

    def reduce_scatter(self, out: Any, tensor: Any, group: tuple[int, ...], *,
                       name: str = "") -> _LocalHandle:
        what = describe("local", "reduce_scatter", name, self.rank, group=group)
        group = check_group(group, self.rank, self.world_size, what)
        in_t, out_t = self._tensor(tensor, what), self._tensor(out, what)
        scatter_chunk(in_t, out_t, group, self.rank, what)
        return self._collective("reduce_scatter", group, name, _exec_reduce_scatter, in_t, out=out_t)

    def broadcast(self, tensor: Any, root: int, group: tuple[int, ...], *,
                  name: str = "") -> _LocalHandle:
        what = describe("local", "broadcast", name, self.rank, peer=root, group=group)
        if root not in tuple(group):
            raise TransportError(f"{what}: root {root} is not in group {tuple(group)}")
        return self._collective("broadcast", group, name, _exec_broadcast,
                                self._tensor(tensor, what), root=root)

    def barrier(self) -> None:
        if self._closed:
            raise TransportError(f"local barrier (rank {self.rank}): the transport is closed")
        self._collective("barrier", tuple(range(self.world_size)), "", _exec_barrier, None).wait()

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Ops inside are issued at once, as outside (nothing to fuse in one process)."""
        yield

    def abort(self, timeout_s: float | None = None) -> None:
        """Closes this virtual rank and fails every pending and future op that involves it, on
        every rank: no wait on it hangs. Never blocks; idempotent."""
        self._closed = True
        self.aborted = True
        self._hub.abort(self.rank)

    def close(self) -> None:
        """Marks this virtual rank closed; pending ops of its peers still time out normally."""
        self._closed = True

    def __enter__(self) -> LocalTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


