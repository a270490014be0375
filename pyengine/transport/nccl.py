"""NCCL through pyengine._C: one process per GPU.

Unique ids travel through a torch.distributed store (passed in, or a TCPStore
from torchrun's MASTER_ADDR/MASTER_PORT). A world communicator plus one per
group in ``groups`` (e.g. ``[(0, 1, 2), (1, 2)]``) are created eagerly, in the
same order on every rank; ranks outside a group skip it. send/recv use the
world communicator with global ranks. Every error text names global ranks.
Init also connects every pair of ranks and every communicator (``connect=True``):
NCCL would otherwise connect inside the first op, which then cannot return until
the peer reaches its matching op.

Streams: each communicator has its own comm stream. An op makes its
communicator's stream wait on an event recorded on the caller's current torch
stream, runs there, and records a completion event; ``Handle.wait()`` only makes
the caller's current stream wait on it (the host does not block). Ops on one
communicator run in issue order. Ops on *different* communicators are not
ordered with each other by the transport: to send the result of an all_reduce
on (1, 2) over the world communicator, ``wait()`` on the all_reduce handle
before issuing the send (the send's comm stream then waits on the caller's
stream, which waits on the all_reduce). Separate streams are what lets one
communicator be aborted while another one's op is stuck (with one shared
stream, the abort would wait for the op queued behind the stuck one, forever).

Completion and failure: ``Handle.synchronize(timeout_s)`` blocks the host
(GIL released) polling the completion event and the async errors of every
communicator of the rank; on an error or timeout all of the rank's
communicators are aborted together, each on its own thread, and TransportError
names op, action name, rank, peer / group (global ranks) and NCCL's text.
``abort()`` does the same on request; ``close()`` destroys them.

Groups: ``with transport.group():`` is one NCCL group (per thread) over every
communicator touched inside; at the end NCCL enqueues it and every touched
communicator is polled until ready. Handles from inside complete only after the
block (calling wait/synchronize inside it raises). Sending to oneself needs
ncclSend and ncclRecv in one group. A group over several communicators
synchronises their streams (NCCL joins the streams of a group).

Communicators are released by ``close()``/``abort()`` (or the context manager),
never by ``__del__``. See docs/nccl.md.
"""

from __future__ import annotations

import contextlib
import datetime
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from pyengine._native import native
from pyengine.transport.base import (
    DEFAULT_TIMEOUT_S,
    TransportError,
    as_tensor,
    check_contiguous,
    find_group,
    check_peer,
    describe,
    scatter_chunk,
)
from pyengine.core.dtypes import name_of
from pyengine.transport.store import store_from_env
from pyengine.transport.streams import rank_stream

__all__ = ["NcclTransport", "nccl_dtype"]

def nccl_dtype(dtype: torch.dtype) -> Any:
    """The pyengine._C.DType for a torch dtype (TransportError when NCCL has no such type here)."""
    try:
        return getattr(native().DType, name_of(dtype))  # _C.DType members use the canonical names
    except (ValueError, AttributeError):
        raise TransportError(f"dtype {dtype} is not supported by the NCCL transport "
                             f"(supported: {sorted(native().DType.__members__)})") from None


class _NcclHandle:
    """One op on one communicator. Issued outside a group, its completion event is recorded
    at once; inside a group, when the group ends (until then it is not complete and cannot be
    waited on)."""

    def __init__(self, comm: Any, stream: torch.cuda.Stream, device: torch.device, op: str,
                 name: str, peer: int, what: str, timeout_s: float):
        C = native()
        self._comm = comm
        self._stream = stream
        self._device = device
        self._op, self._name, self._peer = op, name, peer  # peer: communicator-local, -1: none
        self._what = what
        self._timeout_s = timeout_s
        self._done = C.Event(device.index)  # recorded on the comm stream after the op
        self._start = torch.cuda.Event(enable_timing=True)
        self._end = torch.cuda.Event(enable_timing=True)
        self._start.record(stream)
        self._recorded = False
        self._error: str | None = None  # the group that issued it failed

    def _record(self) -> None:
        self._done.record(self._stream.cuda_stream)
        self._end.record(self._stream)
        self._recorded = True

    def _fail(self, error: str) -> None:
        self._error = error

    def _check_issued(self, call: str) -> None:
        if self._error is not None:
            raise TransportError(f"{self._what} failed with the group that issued it: "
                                 f"{self._error}")
        if not self._recorded:
            raise TransportError(f"{self._what}: {call}() inside the transport.group() block that "
                                 "issued it; NCCL launches the group when the block ends, so wait "
                                 "after the block")

    @property
    def events(self) -> tuple[Any, Any] | None:
        """(start, end) torch timing events around the op on its comm stream, once recorded
        (None while its group is open): the runtime's per-action timeline reads them (the
        window includes waiting for the peer)."""
        return (self._start, self._end) if self._recorded else None

    def wait(self, timeout_s: float | None = None) -> None:
        """Makes the caller's current stream wait on the op; the host does not block (the
        timeout is not used here: see synchronize)."""
        self._check_issued("wait")
        self._done.wait(torch.cuda.current_stream(self._device).cuda_stream)

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Blocks the host until the op completes. On an NCCL error, an abort, or after the
        timeout, every communicator of this rank is aborted and TransportError names the op,
        action name, rank, peer / group (global ranks) and NCCL's own text."""
        self._check_issued("synchronize")
        limit = self._timeout_s if timeout_s is None else timeout_s
        try:
            self._comm.wait(self._done, limit, self._op, self._name, self._peer)
        except native().Error as exc:
            raise TransportError(str(exc)) from exc

    def is_completed(self) -> bool:
        return self._recorded and self._error is None and self._done.query()


class NcclTransport:
    """GPU transport over NCCL; one process per GPU."""

    name = "nccl"

    def __init__(self, *, rank: int, world_size: int, device: torch.device | int | str,
                 groups: Sequence[Sequence[int]] = (), store: Any = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, prefix: str = "pyengine/nccl",
                 connect: bool = True):
        C = native()
        device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
        if device.type != "cuda":
            raise TransportError(f"nccl transport needs a CUDA device, got {device}")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.timeout_s = float(timeout_s)
        self.store = store if store is not None else store_from_env(rank, world_size, timeout_s)
        torch.cuda.set_device(device)
        self._set = C.CommSet()  # a failure on one communicator aborts them all, together
        self._comms: dict[tuple[int, ...], Any] = {}
        self.streams: dict[tuple[int, ...], torch.cuda.Stream] = {}
        """One comm stream per communicator, keyed by its group (global ranks)."""
        self._grouped: list[_NcclHandle] | None = None  # handles issued inside group()
        world = tuple(range(world_size))
        try:
            for index, group in enumerate([world, *(tuple(int(r) for r in g) for g in groups)]):
                if group in self._comms or rank not in group:
                    continue
                self._comms[group] = self._connect(C, f"{prefix}/{index}", group)
                self.streams[group] = rank_stream(device, rank, f"comm{list(group)}")
            if connect:
                self._connect_peers()
        except BaseException:
            self.close(abort=True)
            raise

    def _connect(self, C: Any, key: str, group: tuple[int, ...]) -> Any:
        if self.rank == group[0]:
            self.store.set(key, C.Communicator.unique_id())
        try:
            self.store.wait([key], datetime.timedelta(seconds=self.timeout_s))
        except RuntimeError as exc:
            raise TransportError(f"nccl transport init (rank {self.rank}): rank {group[0]} never "
                                 f"published the unique id for group {group}: {exc}") from exc
        unique_id = self.store.get(key)
        try:
            return C.Communicator(unique_id, len(group), group.index(self.rank), self.device.index,
                                  self.timeout_s, ranks=list(group), comm_set=self._set)
        except C.Error as exc:
            raise TransportError(f"nccl transport init (rank {self.rank}), group {group}: {exc}") from exc

    def _connect_peers(self) -> None:
        """NCCL connects peers lazily, inside the first op that needs a connection, and a
        non-blocking op is not enqueued (so send()/all_reduce() do not return: its completion
        event cannot be recorded before) until the peer reaches its matching op. A rank could
        then stall, or two ranks issuing in different orders deadlock, on the first batch.
        Connect here, while every rank is in init anyway: one element sent to and received
        from every other rank in one group (NCCL connects all of a peer's p2p channels on first
        use), then one all_reduce per communicator, in creation order (the same on every rank).
        Collective algorithms first chosen later (another message size) still connect on first
        use unless NCCL_RUNTIME_CONNECT=0 (docs/nccl.md)."""
        handles = []
        peers = [p for p in range(self.world_size) if p != self.rank]
        if peers:
            one = torch.ones(len(peers), device=self.device)
            got = torch.zeros(len(peers), device=self.device)
            with self.group():
                for i, peer in enumerate(peers):
                    handles.append(self.send(one[i:i + 1], peer, name="connect"))
                    handles.append(self.recv(got[i:i + 1], peer, name="connect"))
        for group in self._comms:
            handles.append(self.all_reduce(torch.zeros(1, device=self.device), group,
                                           name="connect"))
        for h in handles:
            h.synchronize()

    # -- helpers ---------------------------------------------------------------------------
    def _tensor(self, obj: Any, what: str) -> torch.Tensor:
        tensor = as_tensor(obj)
        if tensor.device != self.device:
            raise TransportError(f"{what}: tensor on {tensor.device}, transport on {self.device}")
        check_contiguous(tensor, what)
        return tensor

    def has_group(self, group: tuple[int, ...]) -> bool:
        return tuple(group) in self._comms

    def _comm(self, group: tuple[int, ...], what: str) -> tuple[tuple[int, ...], Any]:
        return find_group(self._comms, group, self.rank, self.world_size, what)

    def _issue(self, op: str, name: str, group: tuple[int, ...], comm: Any, peer: int, what: str,
               tensors: Sequence[torch.Tensor], call: Any) -> _NcclHandle:
        """Orders the op after the caller's current stream, issues it on the communicator's
        stream and (outside a group) records its completion event. peer: communicator-local."""
        C = native()
        stream = self.streams[group]
        ready = C.Event(self.device.index)
        ready.record(torch.cuda.current_stream(self.device).cuda_stream)
        ready.wait(stream.cuda_stream)
        for t in tensors:
            t.record_stream(stream)  # keep the caching allocator from reusing it early
        handle = _NcclHandle(comm, stream, self.device, op, name, peer, what, self.timeout_s)
        try:
            call(stream.cuda_stream)
        except C.Error as exc:
            raise TransportError(str(exc)) from exc
        if self._grouped is not None:
            self._grouped.append(handle)  # the kernels launch at group end: record then
        else:
            handle._record()
        return handle

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """One NCCL group over every communicator touched inside (e.g. the three tensors of
        one activation send, or a send/recv pair to oneself). Wait on the handles after the
        block: NCCL launches the group, and the completion events are recorded, when it
        ends."""
        C = native()
        if self._grouped is not None:
            raise TransportError(f"nccl transport (rank {self.rank}): groups do not nest")
        C.group_start()
        self._grouped = []
        try:
            yield
        except BaseException as body_exc:
            # NCCL's group must be closed whatever happened; what was issued gets launched.
            self._end_group(C, body_exc)
            raise
        self._end_group(C, None)

    def _end_group(self, C: Any, body_exc: BaseException | None) -> None:
        pending, self._grouped = self._grouped, None
        try:
            C.group_end()
        except C.Error as exc:
            for h in pending:
                h._fail(str(exc))
            if body_exc is not None:  # the body's exception stays the one raised
                body_exc.add_note(f"ending the NCCL group (rank {self.rank}) failed too: {exc}")
                return
            ops = ", ".join(h._what for h in pending) or "no ops"
            raise TransportError(f"nccl group on rank {self.rank} ({ops}) failed: {exc}") from exc
        for h in pending:
            h._record()

    # -- protocol --------------------------------------------------------------------------
    def _p2p(self, kind: str, obj: Any, peer: int, name: str) -> _NcclHandle:
        what = describe("nccl", kind, name, self.rank, peer=peer)
        check_peer(peer, self.world_size, what)
        tensor = self._tensor(obj, what)
        group, comm = self._comm(tuple(range(self.world_size)), what)
        fn = comm.send if kind == "send" else comm.recv
        # The world communicator: local ranks are global ranks.
        return self._issue(kind, name, group, comm, peer, what, [tensor], lambda s: fn(
            tensor.data_ptr(), tensor.numel(), nccl_dtype(tensor.dtype), peer, s, name))

    def send(self, tensor: Any, peer: int, *, name: str = "") -> _NcclHandle:
        return self._p2p("send", tensor, peer, name)

    def recv(self, tensor: Any, peer: int, *, name: str = "") -> _NcclHandle:
        return self._p2p("recv", tensor, peer, name)

    def all_reduce(self, tensor: Any, group: tuple[int, ...], *, name: str = "") -> _NcclHandle:
        what = describe("nccl", "all_reduce", name, self.rank, group=group)
        t = self._tensor(tensor, what)
        group, comm = self._comm(group, what)
        C = native()
        return self._issue("all_reduce", name, group, comm, -1, what, [t], lambda s: comm.all_reduce(
            t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.dtype), C.RedOp.sum, s, name))

    def reduce_scatter(self, out: Any, tensor: Any, group: tuple[int, ...], *,
                       name: str = "") -> _NcclHandle:
        what = describe("nccl", "reduce_scatter", name, self.rank, group=group)
        in_t, out_t = self._tensor(tensor, what), self._tensor(out, what)
        group, comm = self._comm(group, what)
        scatter_chunk(in_t, out_t, group, self.rank, what)
        C = native()
        return self._issue("reduce_scatter", name, group, comm, -1, what, [in_t, out_t],
                           lambda s: comm.reduce_scatter(
                               in_t.data_ptr(), out_t.data_ptr(), out_t.numel(),
                               nccl_dtype(in_t.dtype), C.RedOp.sum, s, name))

    def broadcast(self, tensor: Any, root: int, group: tuple[int, ...], *,
                  name: str = "") -> _NcclHandle:
        what = describe("nccl", "broadcast", name, self.rank, peer=root, group=group)
        t = self._tensor(tensor, what)
        group, comm = self._comm(group, what)
        if root not in group:
            raise TransportError(f"{what}: root {root} is not in group {group}")
        local_root = group.index(root)  # NCCL's index; messages map it back to the global rank
        return self._issue("broadcast", name, group, comm, local_root, what, [t],
                           lambda s: comm.broadcast(t.data_ptr(), t.data_ptr(), t.numel(),
                                                    nccl_dtype(t.dtype), local_root, s, name))

    def barrier(self) -> None:
        """A 1-element all_reduce on the world communicator, host-synchronised with the timeout."""
        flag = torch.zeros(1, device=self.device)
        self.all_reduce(flag, tuple(range(self.world_size)), name="barrier").synchronize()

    def abort(self, timeout_s: float | None = None) -> None:
        """Aborts every communicator of this rank together (each on its own thread), waiting at
        most timeout_s (default: the transport's timeout); idempotent. Raises TransportError
        only when an ncclCommAbort did not return within the bound (its thread is left
        running) or failed."""
        limit = self.timeout_s if timeout_s is None else float(timeout_s)
        problems = self._set.abort(limit)
        if problems:
            raise TransportError(f"nccl transport abort (rank {self.rank}): " + "; ".join(problems))

    def close(self, *, abort: bool = False) -> None:
        """Destroys every communicator (abort=True: aborts them all together instead, never
        waiting on peers). A communicator that cannot flush aborts the rest (TransportError)."""
        comms, self._comms = list(self._comms.values()), {}
        if abort:
            self.abort()
            return
        errors = []
        for comm in reversed(comms):
            try:
                comm.destroy()
            except native().Error as exc:
                errors.append(str(exc))
        if errors:
            raise TransportError("nccl transport close: " + "; ".join(errors))

    def __enter__(self) -> NcclTransport:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(abort=exc_type is not None)
