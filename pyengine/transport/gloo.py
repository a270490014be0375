"""torch.distributed gloo on CPU: one real process per rank.

Process groups are built directly (``ProcessGroupGloo``) rather than through
``init_process_group``, so no global state is touched and several transports may
live in one process. The world group and every group in ``groups`` are created
eagerly, in the same order on every rank (each over a prefixed view of the
store). A gloo timeout closes the underlying TCP pairs: after a TransportError
the transport is unusable and should be closed.

``Handle.wait`` and ``Handle.synchronize`` both block the host (CPU backend).
``abort()`` marks the transport aborted and asks gloo to abort its process
groups: every later op, wait or synchronize raises at once. A wait already
blocked inside gloo is not woken by it (torch's gloo abort does not interrupt a
pending recv); it still ends at its own timeout. ``group()`` issues each op at
once (gloo has no launch to fuse); it exists so callers can use one code path.
"""

from __future__ import annotations

import contextlib
import datetime
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist

from pyengine.transport.base import (
    unusable,
    DEFAULT_TIMEOUT_S,
    TransportError,
    as_tensor,
    check_contiguous,
    find_group,
    check_peer,
    describe,
    scatter_chunk,
)

__all__ = ["GlooTransport"]

CONNECT_FLOOR_S = 5.0
"""Least time given to connecting a process group's pairs (see _make_group)."""


class _GlooHandle:
    def __init__(self, work: Any, what: str, timeout_s: float, transport: GlooTransport,
                 finish: Callable[[], None] | None = None):
        self._work = work
        self._what = what
        self._timeout_s = timeout_s
        self._transport = transport
        self._finish = finish
        self._done = False

    def wait(self, timeout_s: float | None = None) -> None:
        """Blocks until done; TransportError naming the op and peer after the timeout."""
        if self._done:
            return
        if self._transport.aborted:
            raise TransportError(f"{self._what} failed: the transport was aborted before it "
                                 "completed")
        limit = self._timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        try:
            self._work.wait(datetime.timedelta(seconds=limit))
        except RuntimeError as exc:
            elapsed = time.monotonic() - start
            timed_out = "timed out" in str(exc).lower() or elapsed >= 0.9 * limit
            verb = "timed out" if timed_out else "failed"
            raise TransportError(f"{self._what} {verb} after {elapsed:.1f} s "
                                 f"(limit {limit:g} s): gloo: {exc}") from exc
        if self._finish is not None:
            self._finish()
        self._done = True

    def synchronize(self, timeout_s: float | None = None) -> None:
        """The same as wait() on CPU: the host blocks until the op is done."""
        self.wait(timeout_s)

    def is_completed(self) -> bool:
        return self._done or (not self._transport.aborted and self._work.is_completed())


class GlooTransport:
    """CPU transport over gloo. Use :func:`pyengine.transport.create_transport` or construct
    directly with a store shared by all ranks (hosted by rank 0)."""

    name = "gloo"

    def __init__(self, *, rank: int, world_size: int, store: Any,
                 groups: Sequence[Sequence[int]] = (), timeout_s: float = DEFAULT_TIMEOUT_S,
                 prefix: str = "pyengine/gloo"):
        if not 0 <= rank < world_size:
            raise TransportError(f"gloo transport: rank {rank} outside [0, {world_size})")
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device("cpu")
        self.timeout_s = float(timeout_s)
        self._closed = False
        self.aborted = False
        self._wait_for_all(store, prefix)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        world = tuple(range(world_size))
        self._world = self._make_group(store, f"{prefix}/g0", world, timeout, "world")
        self._groups: dict[tuple[int, ...], Any] = {world: self._world}
        for index, group in enumerate(groups, start=1):
            group = tuple(int(r) for r in group)
            if group in self._groups or rank not in group:
                continue  # ranks outside a group skip it; group stores are disjoint by prefix
            self._groups[group] = self._make_group(store, f"{prefix}/g{index}", group, timeout,
                                                   f"group {group}")

    def _wait_for_all(self, store: Any, prefix: str) -> None:
        """Every rank announces itself; a rank that never shows up is named (start-up gets at
        least CONNECT_FLOOR_S, whatever the per-op timeout)."""
        store.set(f"{prefix}/joined/{self.rank}", b"1")
        limit = max(self.timeout_s, CONNECT_FLOOR_S)
        deadline = time.monotonic() + limit
        missing = list(range(self.world_size))
        while True:
            missing = [r for r in missing if not store.check([f"{prefix}/joined/{r}"])]
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TransportError(
                    f"gloo transport init (rank {self.rank} of {self.world_size}): rank(s) "
                    f"{missing} never joined within {limit:g} s")
            time.sleep(0.02)

    def _make_group(self, store: Any, key: str, group: tuple[int, ...],
                    timeout: datetime.timedelta, label: str) -> Any:
        # Connecting the TCP pairs gets at least CONNECT_FLOOR_S even when ops may wait only a
        # few milliseconds: a tiny per-op timeout then fails an op cleanly instead of the
        # connection (which gloo retries noisily on stderr); ops get `timeout` after it.
        connect = max(timeout, datetime.timedelta(seconds=CONNECT_FLOOR_S))
        try:
            pg = dist.ProcessGroupGloo(dist.PrefixStore(key, store), group.index(self.rank),
                                       len(group), connect)
        except RuntimeError as exc:
            raise TransportError(f"gloo transport init (rank {self.rank}): connecting {label} "
                                 f"failed: {exc}") from exc
        if connect != timeout:
            pg._set_default_timeout(timeout)
        return pg

    # -- helpers ---------------------------------------------------------------------------
    def _check_open(self, what: str) -> None:
        if self._closed:
            raise TransportError(unusable(what, self.aborted))

    def _tensor(self, obj: Any, what: str) -> torch.Tensor:
        tensor = as_tensor(obj)
        if tensor.device.type != "cpu":
            raise TransportError(f"{what}: gloo transport needs CPU tensors, got {tensor.device}")
        check_contiguous(tensor, what)
        return tensor

    def has_group(self, group: tuple[int, ...]) -> bool:
        return tuple(group) in self._groups

    def _group(self, group: tuple[int, ...], what: str) -> tuple[tuple[int, ...], Any]:
        return find_group(self._groups, group, self.rank, self.world_size, what)

    # -- protocol --------------------------------------------------------------------------
    def send(self, tensor: Any, peer: int, *, name: str = "") -> _GlooHandle:
        what = describe("gloo", "send", name, self.rank, peer=peer)
        self._check_open(what)
        check_peer(peer, self.world_size, what)
        work = self._world.send([self._tensor(tensor, what)], peer, 0)
        return _GlooHandle(work, what, self.timeout_s, self)

    def recv(self, tensor: Any, peer: int, *, name: str = "") -> _GlooHandle:
        what = describe("gloo", "recv", name, self.rank, peer=peer)
        self._check_open(what)
        check_peer(peer, self.world_size, what)
        work = self._world.recv([self._tensor(tensor, what)], peer, 0)
        return _GlooHandle(work, what, self.timeout_s, self)

    def all_reduce(self, tensor: Any, group: tuple[int, ...], *, name: str = "") -> _GlooHandle:
        what = describe("gloo", "all_reduce", name, self.rank, group=group)
        self._check_open(what)
        group, pg = self._group(group, what)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        work = pg.allreduce([self._tensor(tensor, what)], opts)
        return _GlooHandle(work, what, self.timeout_s, self)

    def reduce_scatter(self, out: Any, tensor: Any, group: tuple[int, ...], *,
                       name: str = "") -> _GlooHandle:
        what = describe("gloo", "reduce_scatter", name, self.rank, group=group)
        self._check_open(what)
        group, pg = self._group(group, what)
        out_t = self._tensor(out, what)
        in_t = self._tensor(tensor, what)
        chunks, _ = scatter_chunk(in_t, out_t, group, self.rank, what)
        opts = dist.ReduceScatterOptions()
        opts.reduceOp = dist.ReduceOp.SUM
        work = pg.reduce_scatter([out_t], [chunks], opts)
        return _GlooHandle(work, what, self.timeout_s, self)

    def broadcast(self, tensor: Any, root: int, group: tuple[int, ...], *,
                  name: str = "") -> _GlooHandle:
        what = describe("gloo", "broadcast", name, self.rank, peer=root, group=group)
        self._check_open(what)
        group, pg = self._group(group, what)
        if root not in group:
            raise TransportError(f"{what}: root {root} is not in group {group}")
        opts = dist.BroadcastOptions()
        opts.rootRank = group.index(root)
        opts.rootTensor = 0
        work = pg.broadcast([self._tensor(tensor, what)], opts)
        return _GlooHandle(work, what, self.timeout_s, self)

    def barrier(self) -> None:
        what = describe("gloo", "barrier", "", self.rank, group=tuple(range(self.world_size)))
        self._check_open(what)
        try:
            self._world.monitored_barrier(datetime.timedelta(seconds=self.timeout_s), True)
        except RuntimeError as exc:
            raise TransportError(f"{what} failed: {exc}") from exc

    @contextlib.contextmanager
    def group(self) -> Iterator[None]:
        """Ops inside are issued at once, as outside (gloo has no launch to fuse)."""
        yield

    def abort(self, timeout_s: float | None = None) -> None:
        """Marks the transport aborted (later ops, waits and synchronizes raise at once) and
        aborts gloo's process groups; never waits on peers. A wait already blocked inside
        gloo ends at its own timeout."""
        if self.aborted:
            return
        self.aborted = True
        groups = list(self._groups.values())
        self.close()
        for pg in groups:
            pg.abort()

    def close(self) -> None:
        """Drops the process groups (no collective shutdown, so it never waits on peers)."""
        self._closed = True
        self._groups.clear()
        self._world = None

    def __enter__(self) -> GlooTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
