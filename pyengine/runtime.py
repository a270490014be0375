"""Executes one rank's action table: compute on the compute stream, comm through the transport.

Comm actions are issued asynchronously in table order; a COMPUTE waits only on the handles
of the actions it consumes (its `deps`), so receives for micro-batch i+1 and the TP
reduction / sends of micro-batch i proceed while micro-batch i+1 computes. Every action is
timed (CUDA events on GPU, perf_counter on CPU) and wrapped in an NVTX range named by its id.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field

import torch

from pyengine import schedule, stages
from pyengine.model import torch_dtype
from pyengine.schedule import Action, Kind
from pyengine.spec import DeploymentSpec


class RankError(RuntimeError):
    """A rank failed or stalled inside an action; names both."""

    def __init__(self, rank: int, action: str, cause: BaseException | str):
        self.rank, self.action = rank, action
        super().__init__(f"rank {rank} failed in action {action}: {cause}")


@dataclass(slots=True)
class ActionTime:
    id: str
    kind: str
    stage: int
    micro_batch: int
    lane: str
    start_s: float
    end_s: float


@dataclass(slots=True)
class _Pending:
    action: Action
    handles: list
    issued_s: float
    done_s: float | None = None


@dataclass
class BatchResult:
    logits: torch.Tensor | None
    times: list[ActionTime] = field(default_factory=list)
    t0: float = 0.0
    """perf_counter() at the batch start; times are relative to it. perf_counter is one
    system-wide monotonic clock, so t0 aligns ranks in different processes on one host."""


def _nvtx_range(name: str, cuda: bool):
    """An NVTX range for nsys (torch's binding: present wherever CUDA torch is); none on CPU."""
    return torch.cuda.nvtx.range(name) if cuda else contextlib.nullcontext()


class RankRuntime:
    """One rank of the pipeline. `forward(ids)` returns logits [B, S, V] on the output rank."""

    def __init__(self, spec: DeploymentSpec, rank: int, transport, weights: dict[str, torch.Tensor],
                 device: torch.device, *, table: schedule.Table | None = None, fault: str = ""):
        self.spec, self.rank, self.transport, self.w, self.device = spec, rank, transport, weights, device
        self.fault = _parse_fault(fault, rank)
        full = table if table is not None else schedule.build(spec)
        self.actions = full.get(rank, [])
        self.bounds = spec.micro_batch_bounds()
        self.dtype = torch_dtype(spec)
        self.group = spec.stage("experts").gpus
        self.timeout_s = spec.comm.timeout_s
        self.overlap = spec.comm.overlap
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None

    # ---- public -----------------------------------------------------------------------
    def forward(self, ids: torch.Tensor, *, timed: bool = True) -> BatchResult:
        flat = ids.reshape(-1).to(self.device)
        self._vals: dict[str, object] = {}
        self._pending: dict[str, _Pending] = {}
        self._times: list = []
        self._logits: list[torch.Tensor | None] = [None] * len(self.bounds)
        self._t0 = time.perf_counter()
        self._timed = timed
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        if self.cuda:
            self._ev0 = torch.cuda.Event(enable_timing=True)
            self._ev0.record(self.stream)
        with ctx:
            for a in self.actions:
                try:
                    with _nvtx_range(a.id, self.cuda):
                        self._run(a, flat)
                except RankError:
                    raise
                except Exception as e:  # name the rank and action, keep the cause chained
                    raise RankError(self.rank, a.id, f"{type(e).__name__}: {e}") from e
            self._drain()
        logits = None
        if self.rank == self.spec.stage("output").gpus[0]:
            m = self.spec.model
            logits = torch.cat(self._logits).reshape(m.batch_size, m.seq_len, m.vocab_size)
        times = self._collect_times() if timed else []
        self._vals, self._pending = {}, {}
        return BatchResult(logits, times, self._t0)

    # ---- actions --------------------------------------------------------------------------
    def _run(self, a: Action, flat: torch.Tensor) -> None:
        if self.fault and self.fault[0] == a.id:
            _inject(self.fault[1], self.rank, a.id)
        self._poll()
        if a.kind is Kind.COMPUTE:
            for d in a.deps:
                self._wait(d)
            start = self._mark()
            self._compute(a, flat)
            self._times.append((a, "compute", start, self._mark()))
            return
        for d in a.deps:  # a comm action consuming another comm action's result (e.g. send after reduce)
            if d in self._pending:
                self._wait(d)
        issued = time.perf_counter()
        handles = self._issue(a)
        self._pending[a.id] = _Pending(a, handles, issued)
        if not self.overlap:
            self._wait(a.id)

    def _compute(self, a: Action, flat: torch.Tensor) -> None:
        lo, hi = self.bounds[a.micro_batch]
        if a.stage == 0:
            self._vals[a.id] = stages.stage0(self.spec, self.w, flat[lo:hi])
        elif a.stage == 1:
            _, u, top_ids, top_w = self._act_inputs(a.deps[0])
            self._vals[a.id] = stages.stage1(self.w, u, top_ids, top_w)
        else:
            x = self._resid_input(a.deps[0])
            parts = self._partial_inputs(a.deps[1:], hi - lo)
            self._logits[a.micro_batch] = stages.stage2(self.spec, self.w, x, parts)

    def _act_inputs(self, dep: str):
        v = self._vals[dep]
        return v if len(v) == 4 else (None, *v)

    def _resid_input(self, dep: str) -> torch.Tensor:
        v = self._vals[dep]
        return v[0]  # stage-0 output tuple starts with x; a RECV of resid holds (x,)

    def _partial_inputs(self, deps: tuple[str, ...], tokens: int) -> list[torch.Tensor]:
        parts, halves = [], []
        for d in deps:
            v = self._vals[d]
            if ".half" in d:
                halves.append(v if isinstance(v, torch.Tensor) else v[0])
            else:
                parts.append(v if isinstance(v, torch.Tensor) else v[0])
        if halves:  # reduce-scatter: token chunks in group order (padded to equal size)
            parts.append(torch.cat(halves)[:tokens])
        return parts

    def _payload(self, a: Action) -> tuple[torch.Tensor, ...]:
        src = self._vals[a.deps[0]]
        if a.payload == "act":
            return tuple(src[1:])  # u, top-k ids, top-k weights
        if a.payload == "resid":
            return (src[0],)
        return (src,) if isinstance(src, torch.Tensor) else tuple(src)

    def _recv_buffers(self, a: Action) -> tuple[torch.Tensor, ...]:
        lo, hi = self.bounds[a.micro_batch]
        t, m = hi - lo, self.spec.model
        kw = {"device": self.device}
        if a.payload == "act":
            return (torch.empty(t, m.hidden_size, dtype=self.dtype, **kw),
                    torch.empty(t, m.top_k, dtype=torch.int32, **kw),
                    torch.empty(t, m.top_k, dtype=torch.float32, **kw))
        if a.payload == "half":
            return (torch.empty(self._chunk_rows(t), m.hidden_size, dtype=self.dtype, **kw),)
        return (torch.empty(t, m.hidden_size, dtype=self.dtype, **kw),)

    def _chunk_rows(self, tokens: int) -> int:
        return -(-tokens // len(self.group))

    def _issue(self, a: Action) -> list:
        tr, name = self.transport, a.id
        if a.kind is Kind.SEND:
            return [tr.send(t, a.peers[0], name=name) for t in self._payload(a)]
        if a.kind is Kind.RECV:
            bufs = self._recv_buffers(a)
            self._vals[a.id] = bufs
            return [tr.recv(b, a.peers[0], name=name) for b in bufs]
        partial = self._vals[a.deps[0]]
        if a.payload == "sum":
            self._vals[a.id] = partial
            return [tr.all_reduce(partial, a.peers, name=name)]
        rows = self._chunk_rows(partial.shape[0])
        padded = partial
        if rows * len(a.peers) != partial.shape[0]:  # NCCL reduce-scatter needs equal chunks
            padded = torch.zeros(rows * len(a.peers), partial.shape[1], dtype=partial.dtype,
                                 device=partial.device)
            padded[: partial.shape[0]] = partial
        out = torch.empty(rows, partial.shape[1], dtype=partial.dtype, device=partial.device)
        self._vals[a.id] = out
        self._vals[a.id + "#in"] = padded  # keep the input alive until the op completes
        return [tr.reduce_scatter(out, padded, a.peers, name=name)]

    # ---- waiting and timing -------------------------------------------------------------------
    def _wait(self, action_id: str) -> None:
        p = self._pending.get(action_id)
        if p is None or p.done_s is not None:
            return
        for h in p.handles:
            try:
                h.wait(self.timeout_s)
            except Exception as e:
                raise RankError(self.rank, action_id, f"{type(e).__name__}: {e}") from e
        p.done_s = time.perf_counter()

    def _poll(self) -> None:
        """Note ops seen complete: bounds a CPU comm action's end to the action grain. GPU comm
        is timed by the transport's events and untimed runs need no ends, so skip the queries."""
        if self.cuda or not self._timed:
            return
        now = time.perf_counter()
        for p in self._pending.values():
            if p.done_s is None and all(h.is_completed() for h in p.handles):
                p.done_s = now

    def _drain(self) -> None:
        """Every issued op must complete within the timeout: a stuck peer becomes an error, never a hang."""
        self._poll()
        for aid, p in self._pending.items():
            self._wait(aid)
            deadline = time.monotonic() + self.timeout_s
            while not all(h.is_completed() for h in p.handles):
                if time.monotonic() > deadline:
                    raise RankError(self.rank, aid, f"did not complete within {self.timeout_s:g} s "
                                                    f"(peer(s) {list(p.action.peers)} stuck or dead)")
                time.sleep(1e-4)
        if self.cuda:
            self.stream.synchronize()

    def _mark(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record(self.stream)
            return ev
        return time.perf_counter()

    def _since0(self, mark) -> float:
        if self.cuda:
            return self._ev0.elapsed_time(mark) / 1e3
        return mark - self._t0

    def _collect_times(self) -> list[ActionTime]:
        out = [ActionTime(a.id, a.kind.value, a.stage, a.micro_batch, lane,
                          self._since0(s), self._since0(e))
               for a, lane, s, e in self._times]
        for p in self._pending.values():
            s, e = _handle_window(p, self)
            a = p.action
            out.append(ActionTime(a.id, a.kind.value, a.stage, a.micro_batch, "comm", s, e))
        out.sort(key=lambda t: t.start_s)
        return out


def _handle_window(p: _Pending, rt: RankRuntime) -> tuple[float, float]:
    """Start/end of a comm action: the transport's own CUDA events when it exposes them,
    else issue time to the moment its completion was observed (an upper bound on CPU)."""
    evs = [getattr(h, "events", None) for h in p.handles]
    if rt.cuda and all(e is not None for e in evs):
        for e in evs:
            e[1].synchronize()  # recorded right after the op's completion event: already due
        return (min(rt._since0(e[0]) for e in evs), max(rt._since0(e[1]) for e in evs))
    end = p.done_s if p.done_s is not None else time.perf_counter()
    return p.issued_s - rt._t0, end - rt._t0


def _parse_fault(fault: str, rank: int) -> tuple[str, str] | None:
    """'RANK:ACTION_ID:exit|hang' (testing hook) -> (action id, mode) when it targets `rank`."""
    if not fault:
        return None
    try:
        r, action, mode = fault.split(":")
        r = int(r)
    except ValueError:
        raise ValueError(f"fault = {fault!r}: expected RANK:ACTION_ID:exit|hang") from None
    if mode not in ("exit", "hang"):
        raise ValueError(f"fault = {fault!r}: mode must be exit or hang")
    return (action, mode) if r == rank else None


def _inject(mode: str, rank: int, action: str) -> None:
    import os
    import threading

    if mode == "hang":
        while True:  # a stalled rank: peers must time out and name it
            time.sleep(3600)
    if threading.current_thread() is threading.main_thread():
        os._exit(17)  # a dead process: no exception, no cleanup, like a crash
    raise RuntimeError(f"injected fault: virtual rank {rank} died at {action}")
