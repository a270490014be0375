"""How a rank issues its communication actions: sends (two-phase for a payload whose rows follow the
routing: the count first, then the rows), receives into buffers kept across forwards, and the
experts group's reductions. A mixin of RankRuntime (pyengine.execute.runtime), which runs the actions
in table order; this part knows payloads and transports, not stages.
"""

from __future__ import annotations

from typing import Any

import torch

from pyengine.core.collectives import Collective
from pyengine.core.dtypes import torch_dtype
from pyengine.model.payloads import Payload, PerRank, chunk_rows
from pyengine.schedule import Action, Kind
from pyengine.transport.base import complete


class CommActions:
    """Needs from its host class: spec, device, transport, static, timeout_s, _batch, _vals, _pending,
    _open, _pool, _kept, _side."""

    def _tokens(self, a: Action) -> int:
        return self._batch.chunks[a.micro_batch].tokens

    def _issue(self, a: Action) -> tuple[list, tuple]:
        tr, name, peer = self.transport, a.id, a.peers[0]
        if a.kind is Kind.SEND:
            value = self._vals[a.deps[0]][a.payload]
            tensors = value[peer] if isinstance(value, PerRank) else value
            if not self._sized(a):
                return self._grouped(tr.send, tensors, peer, name), ()
            rows = tensors[0].shape[0]  # two-phase: the count first, then the rows (if any)
            count = _row_count(rows, self.device)
            handles = [tr.send(count, peer, name=f"{name}.count")]
            handles += self._grouped(tr.send, tensors, peer, name) if rows else []
            return handles, (count,)
        if a.kind is Kind.RECV:
            self._post_open(peer)  # messages from one peer are received in the order sent
            if self._sized(a):
                count = torch.empty(1, dtype=torch.int64, device=self.device)
                self._open[peer] = a.key
                return [tr.recv(count, peer, name=f"{name}.count")], (count,)
            bufs = self._buffers(a, self._tokens(a))
            self._vals[a.key] = {a.payload: bufs}
            return self._grouped(tr.recv, bufs, peer, name), ()
        return self._reduce(a)

    def _sized(self, a: Action) -> bool:
        """Its rows follow the routing and travel behind a count; in a static step every message
        has its chunk's rows."""
        return a.payload.sized and not self.static

    def _grouped(self, op, tensors, peer: int, name: str) -> list:
        """The tensors of one message as one transport group (NCCL: one fused launch, not one
        launch and one wait-loop entry per tensor)."""
        if len(tensors) == 1:
            return [op(tensors[0], peer, name=name)]
        with self.transport.group():
            return [op(t, peer, name=name) for t in tensors]

    def _buffers(self, a: Action, rows: int) -> tuple[torch.Tensor, ...]:
        """Receive buffers of `a` for `rows` rows: views of buffers kept from earlier forwards
        (a sized payload's are allocated at its largest, the chunk's tokens), so the steady
        state allocates nothing."""
        full = [b for b in a.payload.buffers(self.spec, max(rows, self._tokens(a)))]
        kept = self._pool.get(a.key)
        if kept is None or any(k.shape[0] < b.rows or k.shape[1] != b.cols for k, b in zip(kept, full)):
            kept = tuple(torch.empty(b.rows, b.cols, dtype=torch_dtype(b.dtype), device=self.device)
                         for b in full)
            self._pool[a.key] = kept
        want = a.payload.buffers(self.spec, rows)
        return tuple(k[: w.rows] for k, w in zip(kept, want))

    def _post_open(self, peer: int) -> None:
        """Post the rows of `peer`'s open sized receive: wait (host) for its count, allocate,
        post. Done lazily (before the next receive from that peer, or when a consumer needs
        it) so the host blocks as late as the message order allows."""
        key = self._open.pop(peer, None)
        if key is None:
            return
        p = self._pending[key]
        complete(p.handles, self.timeout_s)
        rows = _host_int(p.keep_alive[0], self._side)
        bufs = self._buffers(p.action, rows)
        self._vals[key] = {p.action.payload: bufs}
        if rows:
            p.handles += self._grouped(self.transport.recv, bufs, peer, p.action.id)

    def _reduce(self, a: Action) -> tuple[list, tuple]:
        (partial,) = self._vals[a.deps[0]][Payload.PARTIAL]
        if a.payload.collective is Collective.ALL_REDUCE:  # in place: the partial becomes the sum
            self._vals[a.key] = {a.payload: (partial,)}
            return [self.transport.all_reduce(partial, a.peers, name=a.id)], ()
        rows = chunk_rows(partial.shape[0], len(a.peers))
        padded = partial
        if rows * len(a.peers) != partial.shape[0]:  # NCCL's reduce-scatter takes equal chunks
            padded = self._scratch(("padded", a.key), (rows * len(a.peers), partial.shape[1]), partial)
            padded[: partial.shape[0]] = partial
        out = self._scratch(("out", a.key), (rows, partial.shape[1]), partial)
        self._vals[a.key] = {a.payload: (out,)}
        return [self.transport.reduce_scatter(out, padded, a.peers, name=a.id)], (padded,)

    def _scratch(self, key: tuple, shape: tuple[int, int], like: torch.Tensor) -> torch.Tensor:
        """A zeroed buffer for a collective; in a static step the same one every step (a graphed
        consumer reads it where it was captured; its padding rows stay zero)."""
        kept = self._kept.get(key) if self.static else None
        if kept is None:
            kept = torch.zeros(shape, dtype=like.dtype, device=like.device)
            if self.static:
                self._kept[key] = kept
        return kept


def _row_count(rows: int, device) -> torch.Tensor:
    """A sized send's one-element row count, made by a fill kernel on the device: torch.tensor(
    [rows], device=...) is a blocking pageable host->device copy (a sync) on every DISPATCH/COMBINE
    send. The sends' intended syncs are elsewhere (the dispatch's counts, the receive's _host_int)."""
    return torch.full((1,), rows, dtype=torch.int64, device=device)


def _host_int(t: torch.Tensor, side_stream: Any) -> int:
    """A received one-element count on the host. Its receive has completed (the caller waited on
    the host), so a copy on a side stream reads it without waiting for the compute stream."""
    if side_stream is None:
        return int(t.item())  # intended sync: a sized receive's row count sizes its buffers
    with torch.cuda.stream(side_stream):
        return int(t.item())  # intended sync: a sized receive's row count sizes its buffers
