"""NCCL through pyengine._C: one process per GPU.

Unique ids travel through a torch.distributed store (passed in, or a TCPStore
from torchrun's MASTER_ADDR/MASTER_PORT). A world communicator plus one per
group in ``groups`` (e.g. ``[(0, 1, 2), (1, 2)]``) are created eagerly, in the
same order on every rank; ranks outside a group skip it. send/recv use the
world communicator with global ranks.

Streams: every op makes the transport's comm stream wait on an event recorded
on the caller's current torch stream, runs there, and records a completion
event; ``Handle.wait()`` only makes the caller's current stream wait on it (the
host does not block). ``Handle.synchronize(timeout_s)`` blocks the host with
hang detection: it polls the event and NCCL's async error and raises
TransportError naming the op and peer (aborting the communicator) on timeout.

Communicators are released by ``close()`` (or the context manager), never by
``__del__``. Sending to oneself needs ncclSend and ncclRecv in one NCCL group:
use :meth:`NcclTransport.group` around the pair.
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
from pyengine.transport.store import store_from_env

__all__ = ["NcclTransport", "Communicator", "nccl_dtype"]

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.uint8: "uint8",
    torch.float64: "float64",
}


def nccl_dtype(dtype: torch.dtype) -> Any:
    """The pyengine._C.DType for a torch dtype (TransportError when NCCL has no such type here)."""
    try:
        return getattr(native().DType, _DTYPES[dtype])
    except KeyError:
        raise TransportError(f"dtype {dtype} is not supported by the NCCL transport "
                             f"(supported: {sorted(str(d) for d in _DTYPES)})") from None


class Communicator:
    """Owns one pyengine._C.Communicator; ``close()`` (or ``with``) destroys it explicitly."""

    def __init__(self, unique_id: bytes, nranks: int, rank: int, device: int,
                 timeout_s: float = DEFAULT_TIMEOUT_S):
        self.comm = native().Communicator(unique_id, nranks, rank, device, timeout_s)

    def close(self, *, abort: bool = False) -> None:
        """Destroys (flushing outstanding work, bounded by the timeout) or aborts."""
        if abort:
            self.comm.abort()
        else:
            self.comm.destroy()

    def __enter__(self) -> Communicator:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(abort=exc_type is not None)

    def __getattr__(self, attr: str) -> Any:
        if attr == "comm":  # construction failed: there is nothing to delegate to
            raise AttributeError(attr)
        return getattr(self.comm, attr)


class _NcclHandle:
    def __init__(self, done: Any, comm: Any, device: torch.device, what: str, peer: int,
                 timeout_s: float, events: tuple[Any, Any] | None = None):
        self._done = done  # pyengine._C.Event recorded on the comm stream
        self.events = events
        """(start, end) torch timing events around the op on the comm stream: the runtime's
        per-action timeline reads them (the window includes waiting for the peer)."""
        self._comm = comm
        self._device = device
        self._what = what
        self._peer = peer
        self._timeout_s = timeout_s

    def wait(self, timeout_s: float | None = None) -> None:
        """Makes the caller's current stream wait on the op; the host does not block (the
        timeout is not used here: see synchronize)."""
        self._done.wait(torch.cuda.current_stream(self._device).cuda_stream)

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Blocks the host until the op completes; TransportError on timeout or NCCL error."""
        limit = self._timeout_s if timeout_s is None else timeout_s
        try:
            self._comm.wait(self._done, limit, self._what, self._peer)
        except native().Error as exc:
            raise TransportError(str(exc)) from exc

    def is_completed(self) -> bool:
        return self._done.query()


class NcclTransport:
    """GPU transport over NCCL; one process per GPU."""

    name = "nccl"

    def __init__(self, *, rank: int, world_size: int, device: torch.device | int | str,
                 groups: Sequence[Sequence[int]] = (), store: Any = None,
                 timeout_s: float = DEFAULT_TIMEOUT_S, prefix: str = "pyengine/nccl"):
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
        self.stream = torch.cuda.Stream(device)
        self._grouped: list[Any] | None = None  # completion events of ops inside group()
        self._comms: dict[tuple[int, ...], Any] = {}
        world = tuple(range(world_size))
        try:
            for index, group in enumerate([world, *(tuple(int(r) for r in g) for g in groups)]):
                if group in self._comms or rank not in group:
                    continue
                self._comms[group] = self._connect(C, f"{prefix}/{index}", group)
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
                                  self.timeout_s)
        except C.Error as exc:
            raise TransportError(f"nccl transport init (rank {self.rank}), group {group}: {exc}") from exc

    # -- helpers ---------------------------------------------------------------------------
    def _tensor(self, obj: Any, what: str) -> torch.Tensor:
        tensor = as_tensor(obj)
        if tensor.device != self.device:
            raise TransportError(f"{what}: tensor on {tensor.device}, transport on {self.device}")
        check_contiguous(tensor, what)
        return tensor

    def _comm(self, group: tuple[int, ...], what: str) -> tuple[tuple[int, ...], Any]:
        return find_group(self._comms, group, self.rank, self.world_size, what)

    def _issue(self, what: str, comm: Any, peer: int, tensors: Sequence[torch.Tensor],
               call: Any) -> _NcclHandle:
        C = native()
        ready = C.Event(self.device.index)
        ready.record(torch.cuda.current_stream(self.device).cuda_stream)
        ready.wait(self.stream.cuda_stream)
        for t in tensors:
            t.record_stream(self.stream)  # keep the caching allocator from reusing it early
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        try:
            call(self.stream.cuda_stream)
        except C.Error as exc:
            raise TransportError(str(exc)) from exc
        done = C.Event(self.device.index)
        if self._grouped is not None:
            self._grouped.append((done, end))  # the kernels launch at group end: record then
        else:
            done.record(self.stream.cuda_stream)
            end.record(self.stream)
        return _NcclHandle(done, comm, self.device, what, peer, self.timeout_s, (start, end))

    @contextlib.contextmanager
    def group(self, group: tuple[int, ...] | None = None) -> Iterator[None]:
        """Fuses the ops issued inside into one NCCL group on ``group``'s communicator (default:
        world); needed e.g. for send/recv to oneself. Wait on the handles after the block:
        their completion events are recorded when the group ends."""
        if self._grouped is not None:
            raise TransportError("nccl transport: groups do not nest")
        _, comm = self._comm(group or tuple(range(self.world_size)), "nccl group")
        comm.group_start()
        self._grouped = []
        try:
            yield
        finally:
            pending, self._grouped = self._grouped, None
            try:
                comm.group_end()
            except native().Error as exc:
                raise TransportError(str(exc)) from exc
            for done, end in pending:
                done.record(self.stream.cuda_stream)
                end.record(self.stream)

    # -- protocol --------------------------------------------------------------------------
    def _p2p(self, kind: str, obj: Any, peer: int, name: str) -> _NcclHandle:
        what = describe("nccl", kind, name, self.rank, peer=peer)
        check_peer(peer, self.world_size, what)
        tensor = self._tensor(obj, what)
        _, comm = self._comm(tuple(range(self.world_size)), what)
        fn = comm.send if kind == "send" else comm.recv
        return self._issue(what, comm, peer, [tensor], lambda s: fn(
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
        return self._issue(what, comm, -1, [t], lambda s: comm.all_reduce(
            t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.dtype), C.RedOp.sum, s, name))

    def reduce_scatter(self, out: Any, tensor: Any, group: tuple[int, ...], *,
                       name: str = "") -> _NcclHandle:
        what = describe("nccl", "reduce_scatter", name, self.rank, group=group)
        in_t, out_t = self._tensor(tensor, what), self._tensor(out, what)
        group, comm = self._comm(group, what)
        scatter_chunk(in_t, out_t, group, self.rank, what)
        C = native()
        return self._issue(what, comm, -1, [in_t, out_t], lambda s: comm.reduce_scatter(
            in_t.data_ptr(), out_t.data_ptr(), out_t.numel(), nccl_dtype(in_t.dtype), C.RedOp.sum,
            s, name))

    def broadcast(self, tensor: Any, root: int, group: tuple[int, ...], *,
                  name: str = "") -> _NcclHandle:
        what = describe("nccl", "broadcast", name, self.rank, peer=root, group=group)
        t = self._tensor(tensor, what)
        group, comm = self._comm(group, what)
        if root not in group:
            raise TransportError(f"{what}: root {root} is not in group {group}")
        return self._issue(what, comm, root, [t], lambda s: comm.broadcast(
            t.data_ptr(), t.data_ptr(), t.numel(), nccl_dtype(t.dtype), group.index(root), s,
            name))

    def barrier(self) -> None:
        """A 1-element all_reduce on the world communicator, host-synchronised with the timeout."""
        flag = torch.zeros(1, device=self.device)
        self.all_reduce(flag, tuple(range(self.world_size)), name="barrier").synchronize()

    def close(self, *, abort: bool = False) -> None:
        """Destroys every communicator (abort=True: aborts instead, never waiting on peers)."""
        comms, self._comms = list(self._comms.values()), {}
        errors = []
        for comm in reversed(comms):
            try:
                comm.abort() if abort else comm.destroy()
            except native().Error as exc:
                errors.append(str(exc))
        if errors:
            raise TransportError("nccl transport close: " + "; ".join(errors))

    def __enter__(self) -> NcclTransport:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.close(abort=exc_type is not None)
