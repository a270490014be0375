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
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from pyengine.transport.base import (
    unusable,
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
from pyengine.transport.local_hub import (Completion, Hub, PendingOp, exec_all_reduce, exec_barrier,
                                          exec_broadcast, exec_reduce_scatter)
from pyengine.transport.streams import rank_stream


class _LocalHandle:
    def __init__(self, hub: Hub, done: Completion, what: str, pending: Callable[[], str]):
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


class LocalTransport:
    """One virtual rank of an in-process group; see the module docstring."""

    name = "local"

    @classmethod
    def create(cls, world_size: int, device: torch.device | str = "cpu",
               timeout_s: float = DEFAULT_TIMEOUT_S) -> list[LocalTransport]:
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            raise TransportError(f"local transport: world_size = {world_size!r}: must be an integer >= 1")
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) \
                or not math.isfinite(timeout_s) or timeout_s <= 0:
            raise TransportError(f"local transport: timeout_s = {timeout_s!r}: must be a positive "
                                 "number of seconds")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise TransportError(f"local transport: device = {device!r}: {e}") from None
        if device.type not in ("cpu", "cuda"):
            raise TransportError(f"local transport: device = {str(device)!r}: must be 'cpu' or a CUDA device")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise TransportError(f"local transport: device = {str(device)!r}: torch sees no CUDA "
                                 "device here (use 'cpu')")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        hub = Hub(world_size, device, float(timeout_s))
        return [cls(hub, rank) for rank in range(world_size)]

    def __init__(self, hub: Hub, rank: int):
        self._hub = hub
        self.rank = rank
        self.world_size = hub.world_size
        self.device = hub.device
        self.timeout_s = hub.timeout_s
        # per rank, shared by every hub of the process: fresh ones per hub wrap torch's pool
        self.stream = rank_stream(hub.device, rank, "comm") if hub.cuda else None
        self._closed = False
        self.aborted = False

    # -- helpers ---------------------------------------------------------------------------
    def _tensor(self, obj: Any, what: str) -> torch.Tensor:
        if self._closed:
            raise TransportError(unusable(what, self.aborted))
        tensor = as_tensor(obj)
        if tensor.device != self.device:
            raise TransportError(f"{what}: tensor on {tensor.device}, transport on {self.device}")
        check_contiguous(tensor, what)
        return tensor

    def _part(self, tensor: torch.Tensor | None, **extra: Any) -> PendingOp:
        ready = self._hub.record(torch.cuda.current_stream(self.device)) if self._hub.cuda else None
        return PendingOp(self.rank, tensor, ready, self.stream, **extra)

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

    def has_group(self, group: tuple[int, ...]) -> bool:
        """Any group of this hub's ranks (the hub meets members on demand)."""
        return all(isinstance(r, int) and 0 <= r < self.world_size for r in group)

    def all_reduce(self, tensor: Any, group: tuple[int, ...], *, name: str = "") -> _LocalHandle:
        what = describe("local", "all_reduce", name, self.rank, group=group)
        return self._collective("all_reduce", group, name, exec_all_reduce,
                                self._tensor(tensor, what))

    def reduce_scatter(self, out: Any, tensor: Any, group: tuple[int, ...], *,
                       name: str = "") -> _LocalHandle:
        what = describe("local", "reduce_scatter", name, self.rank, group=group)
        group = check_group(group, self.rank, self.world_size, what)
        in_t, out_t = self._tensor(tensor, what), self._tensor(out, what)
        scatter_chunk(in_t, out_t, group, self.rank, what)
        return self._collective("reduce_scatter", group, name, exec_reduce_scatter, in_t, out=out_t)

    def broadcast(self, tensor: Any, root: int, group: tuple[int, ...], *,
                  name: str = "") -> _LocalHandle:
        what = describe("local", "broadcast", name, self.rank, peer=root, group=group)
        if root not in tuple(group):
            raise TransportError(f"{what}: root {root} is not in group {tuple(group)}")
        return self._collective("broadcast", group, name, exec_broadcast,
                                self._tensor(tensor, what), root=root)

    def barrier(self) -> None:
        if self._closed:
            raise TransportError(f"local barrier (rank {self.rank}): the transport is closed")
        self._collective("barrier", tuple(range(self.world_size)), "", exec_barrier, None).wait()

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


