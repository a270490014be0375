"""Executes one rank's action table: compute on the compute stream, comm through the transport.

Comm actions are issued asynchronously in table order; a COMPUTE waits only on the handles of
the actions it consumes (its `deps`), so receives for micro-batch i+1 and the TP reduction /
sends of micro-batch i proceed while micro-batch i+1 computes. Every action is timed (CUDA
events on GPU, perf_counter on CPU) and wrapped in an NVTX range named by its id.

Values are typed: each action's result is {Payload: tensors}; a compute's inputs are its
deps' results grouped by payload, in dep order. Nothing here knows what a stage computes
(pyengine.model.stages) or which payloads a boundary moves (pyengine.model.boundaries).
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pyengine.core.collectives import Collective
from pyengine.core.dtypes import torch_dtype
from pyengine.core.spec import DeploymentSpec
from pyengine.execute.faults import Fault
from pyengine.execute.results import ActionTime
from pyengine.execute.timer import Timer
from pyengine.model.batch import Batch
from pyengine.model.payloads import Payload, PerRank, chunk_rows
from pyengine.model.ops import ops_for
from pyengine.model.stages import Work, stages_of
from pyengine.model.tensors import LayerWeights
from pyengine.schedule import Action, ActionId, Kind, Table, build
from pyengine.transport.base import complete
from pyengine.transport.streams import check_distinct, rank_stream, transport_streams


class RankError(RuntimeError):
    """A rank failed or stalled inside an action; names both."""

    def __init__(self, rank: int, action: str, cause: BaseException | str):
        self.rank, self.action = rank, action
        super().__init__(f"rank {rank} failed in action {action}: {cause}")


@dataclass(slots=True)
class _Pending:
    action: Action
    handles: list
    issued_s: float
    keep_alive: tuple = ()
    """Buffers the op reads that nothing else references (e.g. a padded reduce-scatter input)."""
    done_s: float | None = None


@dataclass
class BatchResult:
    logits: torch.Tensor | None
    """[B, S, V] for the spec's own batch; [rows, V] for another batch (its logit rows)."""
    times: list[ActionTime] = field(default_factory=list)
    t0: float = 0.0
    """perf_counter() at the batch start; times are relative to it."""


def _nvtx_range(name: str, cuda: bool):
    """An NVTX range for nsys (torch's binding: present wherever CUDA torch is); none on CPU."""
    return torch.cuda.nvtx.range(name) if cuda else contextlib.nullcontext()


class RankRuntime:
    """One rank of the pipeline. `forward(ids)` returns logits [B, S, V] on the output rank.

    `batch` (default: the spec's own) fixes the micro-batch count and which chunks share a
    sequence; forward() then takes any batch of that structure (a decode step of growing
    positions, say). `cache` (sequences, capacity) sizes the attention rank's KV cache,
    allocated once (default: the batch's sequences and lengths)."""

    def __init__(self, spec: DeploymentSpec, rank: int, transport, weights: dict[str, torch.Tensor],
                 device: torch.device, *, table: Table | None = None, fault: Fault | None = None,
                 on_action: Callable[[str, bool], None] | None = None, batch: Batch | None = None,
                 cache: tuple[int, int] | Any = None):
        self.spec, self.rank, self.transport, self.w, self.device = spec, rank, transport, weights, device
        # Liveness hook (pyengine.execute.liveness): on_action(id, False) as an action starts,
        # on_action(id, True) while blocked on action `id`'s comm; it must cost ~nothing.
        self.on_action = on_action or (lambda action, waiting: None)
        self._current = ""
        self.fault = fault if fault is not None and fault.rank == rank else None
        self.batch = batch or Batch.of_spec(spec)
        self.actions = (table if table is not None else build(spec, batch=self.batch)).get(rank, [])
        self.stages = stages_of(spec)
        self._layer_w = {}  # layer -> LayerWeights view (built once)
        self.timeout_s = spec.comm.timeout_s
        self.overlap = spec.comm.overlap
        self.cuda = device.type == "cuda"
        self.stream = rank_stream(device, rank, "compute") if self.cuda else None
        self._side = rank_stream(device, rank, "side") if self.cuda else None  # reads received counts
        check_distinct(rank, {"compute": self.stream, "side": self._side, **transport_streams(transport)})
        self.timer = Timer(device, self.stream)
        self.is_output = rank in spec.stage("output").gpus
        self.attends = any(st.attends and rank in st.ranks for st in self.stages)
        from pyengine.model.kv_cache import KVCache

        self.cache = cache if isinstance(cache, KVCache) else None
        self.rope = None
        self.ops = ops_for(spec, device)
        if self.attends:
            from pyengine.model.attention import fuse_qkv

            fuse_qkv(weights, self.stages[0].layers())
        self._cache_shape = cache if isinstance(cache, tuple) else (self.batch.sequences, max(self.batch.lengths))
        self._pool: dict[ActionId, tuple[torch.Tensor, ...]] = {}  # receive buffers, reused
        self.static = False
        self.routes: dict[tuple[int | None, int], torch.Tensor] = {}
        """(layer, micro-batch) -> the router's top-k ids in the last forward (router rank)."""

    # ---- public -----------------------------------------------------------------------
    def stream_context(self):
        """Work issued inside runs on this rank's compute stream (ordered before its kernels)."""
        return torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()

    def forward(self, ids: torch.Tensor, *, timed: bool = True, batch: Batch | None = None,
                tables: list | None = None) -> BatchResult:
        """One forward of `batch` (default: the runtime's): ids hold its tokens, [B, S] or flat.
        `tables` (a static decode step: the attention rank's chunk tables in persistent buffers,
        already written; [] elsewhere) makes the forward static: every message has its chunk's
        rows (no count messages, no host sync to size a receive) and the forward allocates nothing
        that depends on the data."""
        batch = batch or self.batch
        if batch.micro_batches != self.batch.micro_batches or batch.kv_order() != self.batch.kv_order():
            raise ValueError(f"batch of {batch.micro_batches} micro-batches (chunk order "
                             f"{batch.kv_order()}) does not fit the tables built for "
                             f"{self.batch.micro_batches} ({self.batch.kv_order()})")
        # non_blocking: the driver stages a pageable host->device copy before returning (the ids
        # may be freed at once), and no stream sync is issued for it
        flat = ids.reshape(-1).to(self.device, non_blocking=True)
        self._batch = batch
        self._vals: dict[ActionId, dict[Payload, tuple]] = {}
        self._pending: dict[ActionId, _Pending] = {}
        self._open: dict[int, ActionId] = {}  # peer -> its sized receive still waiting for a count
        self._times: list = []
        self._logits: list[torch.Tensor | None] = [None] * batch.micro_batches
        self._t0 = time.perf_counter()
        self._timed = timed
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        self._mark0 = self.timer.mark()
        with ctx:
            try:
                self.static = tables is not None
                self._tables = tables if self.static else self._prepare(batch)
                self._run_all(flat)
            except BaseException:
                self.transport.abort()  # fail this rank's pending ops everywhere: nobody waits on it
                raise
        logits = None
        if self.is_output:
            logits = torch.cat(self._logits)
            if batch is self.batch and batch.logits_all and self.batch == Batch.of_spec(self.spec):
                m = self.spec.model
                logits = logits.reshape(m.batch_size, m.seq_len, m.vocab_size)
        times = self._collect_times() if timed else []
        self._vals, self._pending = {}, {}
        return BatchResult(logits, times, self._t0)

    def _prepare(self, batch: Batch) -> list:
        """The attention rank's per-forward state: the KV cache (allocated once, blocks handed out
        as sequences grow) and each chunk's tables, from one host-to-device copy of the rows'
        positions, slots and lengths."""
        if not self.attends:
            return []
        from pyengine.model.attention import chunk_tables, host_meta, key_blocks

        self._ensure_cache(max(s.seq for c in batch.chunks for s in c.segments) + 1, max(batch.lengths))
        self.cache.grow({seq: n for seq, n in zip(batch.slots or range(batch.sequences), batch.lengths)})
        rows = [host_meta(c) for c in batch.chunks]
        meta = torch.tensor([sum((r[i] for r in rows), []) for i in range(3)], dtype=torch.int32)
        meta = meta.to(self.device, non_blocking=True)  # pageable, staged by the driver: no stream sync
        dtype = torch_dtype(self.spec.model.dtype)
        return [chunk_tables(self.cache, self.rope, c, meta[:, c.lo:c.hi], dtype,
                             key_blocks(c, self.cache.block_size)) for c in batch.chunks]

    def _ensure_cache(self, slots: int, capacity: int) -> None:
        from pyengine.model.attention import RopeTables
        from pyengine.model.kv_cache import KVCache

        if self.cache is None or not self.cache.fits(slots, capacity):
            shape = tuple(max(a, b) for a, b in zip(self._cache_shape, (slots, capacity)))
            self.cache = KVCache(self.spec, *shape, self.device, torch_dtype(self.spec.model.dtype))
        if self.rope is None or self.rope.capacity < self.cache.capacity:
            m = self.spec.model
            self.rope = RopeTables.make(self.cache.capacity, m.head_size, m.rope_theta, self.device)

    # ---- actions --------------------------------------------------------------------------
    def _run_all(self, flat: torch.Tensor) -> None:
        for a in self.actions:
            self._current = a.id
            self.on_action(a.id, False)
            try:
                with _nvtx_range(a.id, self.cuda):
                    self._run(a, flat)
            except RankError:
                raise
            except Exception as e:  # name the rank and action, keep the cause chained
                raise RankError(self.rank, a.id, f"{type(e).__name__}: {e}") from e
        self._drain()

    def _run(self, a: Action, flat: torch.Tensor) -> None:
        if self.fault is not None and self.fault.action == a.id:
            self.fault.trigger(self.w)
        self._poll()
        if a.kind is Kind.COMPUTE:
            for d in a.deps:
                self._wait(d)
            start = self.timer.mark()
            self._compute(a, flat)
            self._times.append((a, "compute", start, self.timer.mark()))
            return
        for d in a.deps:  # a comm action consuming another comm action's result (send after reduce)
            if d in self._pending:
                self._wait(d)
        issued = time.perf_counter()
        handles, keep = self._issue(a)
        self._pending[a.key] = _Pending(a, handles, issued, keep)
        if not self.overlap:
            self._wait(a.key)

    def _compute(self, a: Action, flat: torch.Tensor) -> None:
        chunk = self._batch.chunks[a.micro_batch]
        inputs: dict[Payload, list[tuple]] = defaultdict(list)
        for d in a.deps:
            for payload, value in self._vals[d].items():
                if isinstance(value, PerRank):  # a per-destination value: this rank's part, if any
                    if self.rank not in value:
                        continue
                    value = value[self.rank]
                inputs[payload].append(value)
        stage = self.stages[a.stage]
        work = Work(a.layer, chunk, self.cache, self._tables[a.micro_batch] if stage.attends else None,
                    self._batch.logits_all, self.ops, self.static)
        out = stage.compute(self._weights(a.layer), flat[chunk.lo:chunk.hi], inputs, work)
        self._vals[a.key] = out
        if Payload.LOGITS in out:
            self._logits[a.micro_batch] = out[Payload.LOGITS][0]
        if Payload.ROUTES in out:
            self.routes[(a.layer, a.micro_batch)] = out[Payload.ROUTES][0]

    def _weights(self, layer: int | None) -> LayerWeights:
        if layer not in self._layer_w:
            self._layer_w[layer] = LayerWeights(self.w, layer)
        return self._layer_w[layer]

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
            padded = torch.zeros(rows * len(a.peers), partial.shape[1], dtype=partial.dtype,
                                 device=partial.device)
            padded[: partial.shape[0]] = partial
        out = torch.empty(rows, partial.shape[1], dtype=partial.dtype, device=partial.device)
        self._vals[a.key] = {a.payload: (out,)}
        return [self.transport.reduce_scatter(out, padded, a.peers, name=a.id)], (padded,)

    # ---- waiting and timing -------------------------------------------------------------------
    def _wait(self, key: ActionId) -> None:
        p = self._pending.get(key)
        if p is None or p.done_s is not None:
            return
        if self._open.get(p.action.peers[0]) == key:
            self._post_open(p.action.peers[0])
        self.on_action(str(key), True)
        for h in p.handles:
            try:
                h.wait(self.timeout_s)
            except Exception as e:
                raise RankError(self.rank, str(key), f"{type(e).__name__}: {e}") from e
        p.done_s = time.perf_counter()
        self.on_action(self._current, False)

    def _poll(self) -> None:
        """Note ops seen complete: bounds a CPU comm action's end to the action grain. GPU comm
        is timed by the transport's events and untimed runs need no ends, so skip the queries."""
        if self.cuda or not self._timed:
            return
        now = time.perf_counter()
        waiting = set(self._open.values())
        for key, p in self._pending.items():
            if p.done_s is None and key not in waiting and all(h.is_completed() for h in p.handles):
                p.done_s = now

    def _drain(self) -> None:
        """Every issued op must complete within the timeout: a stuck peer becomes an error, never a hang."""
        for peer in list(self._open):
            self._post_open(peer)
        self._poll()
        for key, p in self._pending.items():
            self._wait(key)
            try:  # host-side completion with the backend's own error (NCCL: aborts the rank's comms)
                complete(p.handles, self.timeout_s)
            except Exception as e:
                raise RankError(self.rank, str(key), f"did not complete (peer(s) {list(p.action.peers)}): "
                                                     f"{type(e).__name__}: {e}") from e
        if self.cuda:
            self.stream.synchronize()  # intended sync: the batch is done when its last kernel is

    def _since0(self, mark: Any) -> float:
        return self.timer.elapsed(self._mark0, mark)

    def _collect_times(self) -> list[ActionTime]:
        out = [ActionTime(a.id, a.kind.value, a.stage, a.micro_batch, lane,
                          self._since0(s), self._since0(e))
               for a, lane, s, e in self._times]
        for p in self._pending.values():
            s, e = self._comm_window(p)
            a = p.action
            out.append(ActionTime(a.id, a.kind.value, a.stage, a.micro_batch, "comm", s, e))
        out.sort(key=lambda t: t.start_s)
        return out

    def _comm_window(self, p: _Pending) -> tuple[float, float]:
        """Start/end of a comm action: the transport's own CUDA events when it exposes them,
        else issue time to the moment its completion was observed (an upper bound on CPU)."""
        evs = [getattr(h, "events", None) for h in p.handles]
        if self.cuda and all(e is not None for e in evs):
            return (min(self._since0(e[0]) for e in evs), max(self._since0(e[1]) for e in evs))
        end = p.done_s if p.done_s is not None else time.perf_counter()
        return p.issued_s - self._t0, end - self._t0


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
