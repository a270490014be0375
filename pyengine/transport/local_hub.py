"""The rendezvous state shared by the virtual ranks of one LocalTransport.create() call:
FIFO mailboxes per (src, dst) for send/recv, one rendezvous per (group, n-th call) for
collectives, and the copies/sums performed on the receiver's (or last arriver's) comm stream."""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pyengine.transport.base import (
    TransportError,
)

__all__ = ["Completion", "Hub", "PendingOp", "Rendezvous", "exec_all_reduce", "exec_barrier",
           "exec_broadcast", "exec_reduce_scatter"]


@dataclass(eq=False)
class Completion:
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
class PendingOp:
    """One side of a point-to-point message or one member's part of a collective."""

    rank: int
    tensor: torch.Tensor | None
    ready: Any  # event recorded on the issuer's current stream (None on CPU)
    stream: Any  # the issuer's comm stream (None on CPU)
    out: torch.Tensor | None = None
    root: int | None = None


@dataclass(eq=False)
class Rendezvous:
    op: str
    group: tuple[int, ...]
    parts: dict[int, PendingOp] = field(default_factory=dict)
    done: Completion = field(default_factory=Completion)


class Hub:
    """State shared by the virtual ranks of one LocalTransport.create() call."""

    def __init__(self, world_size: int, device: torch.device, timeout_s: float):
        self.world_size = world_size
        self.device = device
        self.timeout_s = timeout_s
        self.cuda = device.type == "cuda"
        self.lock = threading.Lock()
        self.sends: dict[tuple[int, int], deque[tuple[PendingOp, Completion]]] = {}
        self.recvs: dict[tuple[int, int], deque[tuple[PendingOp, Completion]]] = {}
        self.rendezvous: dict[tuple[tuple[int, ...], int], Rendezvous] = {}
        self.calls: dict[tuple[int, tuple[int, ...]], int] = {}
        self.aborted: set[int] = set()  # virtual ranks whose transport was aborted

    @staticmethod
    def aborted_error(ranks: set[int]) -> str:
        return f"rank(s) {sorted(ranks)} aborted their transport"

    def abort(self, rank: int) -> None:
        """Fails every pending op involving ``rank`` (on every rank) and, from now on, every
        new one."""
        error = self.aborted_error({rank})
        doomed: list[Completion] = []
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
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    # -- point to point --------------------------------------------------------------------
    def post(self, kind: str, src: int, dst: int, part: PendingOp) -> Completion:
        """kind "send" (part from src) or "recv" (part owned by dst); matches FIFO per pair."""
        done = Completion()
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

    def _deliver(self, msg: PendingOp, msg_done: Completion, slot: PendingOp,
                 slot_done: Completion) -> None:
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
    def join(self, op: str, group: tuple[int, ...], part: PendingOp,
             execute: Callable[[Rendezvous, Any], None]) -> Rendezvous:
        with self.lock:
            seq = self.calls.get((part.rank, group), 0)
            self.calls[(part.rank, group)] = seq + 1
            gone = self.aborted & set(group)
            if gone:
                rv = Rendezvous(op, group)
                rv.done.finish(error=self.aborted_error(gone))
                return rv
            key = (group, seq)
            rv = self.rendezvous.setdefault(key, Rendezvous(op, group))
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

    def missing(self, rv: Rendezvous) -> list[int]:
        with self.lock:
            return [r for r in rv.group if r not in rv.parts]



def sum_in_order(tensors: list[torch.Tensor]) -> torch.Tensor:
    acc = tensors[0].clone()
    for t in tensors[1:]:
        acc.add_(t)
    return acc


def same_shapes(rv: Rendezvous, attr: str) -> None:
    shapes = {r: (tuple(getattr(p, attr).shape), getattr(p, attr).dtype) for r, p in rv.parts.items()}
    if len(set(shapes.values())) != 1:
        raise TransportError(f"{rv.op} on group {rv.group}: members disagree on shape/dtype {shapes}")


def exec_all_reduce(rv: Rendezvous, stream: Any) -> None:
    same_shapes(rv, "tensor")
    acc = sum_in_order([rv.parts[r].tensor for r in rv.group])
    for r in rv.group:
        rv.parts[r].tensor.copy_(acc)


def exec_reduce_scatter(rv: Rendezvous, stream: Any) -> None:
    same_shapes(rv, "tensor")
    chunks = sum_in_order([rv.parts[r].tensor for r in rv.group]).chunk(len(rv.group), dim=0)
    for i, r in enumerate(rv.group):
        rv.parts[r].out.copy_(chunks[i])


def exec_broadcast(rv: Rendezvous, stream: Any) -> None:
    same_shapes(rv, "tensor")
    roots = {p.root for p in rv.parts.values()}
    if len(roots) != 1:
        raise TransportError(f"broadcast on group {rv.group}: members disagree on the root {roots}")
    root = roots.pop()
    src = rv.parts[root].tensor
    for r in rv.group:
        if r != root:
            rv.parts[r].tensor.copy_(src)


def exec_barrier(rv: Rendezvous, stream: Any) -> None:
    return None
