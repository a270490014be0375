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

from pyengine.core.dtypes import torch_dtype
from pyengine.core.spec import DeploymentSpec
from pyengine.execute.faults import Fault
from pyengine.execute.results import ActionTime
from pyengine.execute.runtime_comm import CommActions
from pyengine.execute.timer import Timer
from pyengine.model.batch import Batch
from pyengine.model.payloads import Payload, PerRank
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


class RankRuntime(CommActions):
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
        self._kept: dict[tuple, torch.Tensor] = {}  # a static runtime's collective buffers
        self.graphs = None
        """A static runtime's CUDA graphs (pyengine.execute.graphs.SegmentGraphs), set by its owner."""
        self.launches = None
        """A pyengine.execute.launches.LaunchCounter: counts each compute action's launches."""
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
        self._mark0 = self.timer.mark() if timed else None
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
            self.rope = RopeTables.for_model(m, self.cache.capacity, self.device)

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
            start = self.timer.mark() if self._timed else None  # events only on timed forwards
            with self._counting(a):
                if self.graphs is not None and self.static:
                    out = self.graphs.run(a.key, lambda: self._compute(a, flat), (flat, self._inputs(a)))
                else:
                    out = self._compute(a, flat)
            self._store(a, out)
            if self._timed:
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

    def _inputs(self, a: Action) -> dict[Payload, list[tuple]]:
        """A compute's inputs: its deps' results grouped by payload, in dep order."""
        inputs: dict[Payload, list[tuple]] = defaultdict(list)
        for d in a.deps:
            for payload, value in self._vals[d].items():
                if isinstance(value, PerRank):  # a per-destination value: this rank's part, if any
                    if self.rank not in value:
                        continue
                    value = value[self.rank]
                inputs[payload].append(value)
        return inputs

    def _compute(self, a: Action, flat: torch.Tensor) -> dict[Payload, tuple]:
        chunk = self._batch.chunks[a.micro_batch]
        stage = self.stages[a.stage]
        work = Work(a.layer, chunk, self.cache, self._tables[a.micro_batch] if stage.attends else None,
                    self._batch.logits_all, self.ops, self.static)
        return stage.compute(self._weights(a.layer), flat[chunk.lo:chunk.hi], self._inputs(a), work)

    def _counting(self, a: Action):
        return self.launches.action(str(a.key)) if self.launches is not None else contextlib.nullcontext()

    def _store(self, a: Action, out: dict[Payload, tuple]) -> None:
        self._vals[a.key] = out
        if Payload.LOGITS in out:
            self._logits[a.micro_batch] = out[Payload.LOGITS][0]
        if Payload.ROUTES in out:
            self.routes[(a.layer, a.micro_batch)] = out[Payload.ROUTES][0]

    def _weights(self, layer: int | None) -> LayerWeights:
        if layer not in self._layer_w:
            self._layer_w[layer] = LayerWeights(self.w, layer)
        return self._layer_w[layer]

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
