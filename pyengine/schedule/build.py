"""spec -> per-rank action tables, built from a witness.

The witness is one global sequence in which every SEND sits next to its RECV and every
REDUCE next to its peers; each rank's table is that sequence restricted to the rank, so the
tables are deadlock-free by construction (check() proves it again). The data flow comes from
the stage objects (what each stage consumes from which) and the boundary (the experts ->
output hand-off); nothing here knows a stage by number.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

from pyengine.core.spec import DeploymentSpec
from pyengine.model.boundaries import boundary_of
from pyengine.model.stages import StageKind, stages_of
from pyengine.schedule.actions import (Action, ActionId, Kind, ScheduleError, Table, compute_id,
                                       pair)
from pyengine.schedule.check import check

SCHEDULE_KINDS = ("gpipe", "asready")


def build(spec: DeploymentSpec, kind: str | None = None) -> Table:
    """Per-rank action tables for `spec` (kind defaults to spec.schedule.kind), checked."""
    kind = kind or spec.schedule.kind
    if kind not in SCHEDULE_KINDS:
        raise ScheduleError(f"schedule kind = {kind!r}: must be one of {list(SCHEDULE_KINDS)}")
    table = _Flow(spec).witness(kind)
    check(table)
    return table


class _Flow:
    """The data flow of one batch: which compute produces what, and who must receive it."""

    def __init__(self, spec: DeploymentSpec):
        self.m = spec.schedule.micro_batches
        self.stages = stages_of(spec)
        self.boundary = boundary_of(spec)
        self.group = self.stages[StageKind.EXPERTS].ranks
        self.out = self.stages[StageKind.OUTPUT].ranks[0]
        # Relative compute costs only order the witness (who is likely ready first).
        self.cost = {(st.kind, mb, r): st.flops(t, r)
                     for mb, t in enumerate(spec.micro_batch_sizes())
                     for st in self.stages for r in st.ranks}

    def _producer(self, stage: StageKind) -> int:
        ranks = self.stages[stage].ranks
        if len(ranks) != 1:
            raise ScheduleError(f"internal: stage {stage.name} has {len(ranks)} ranks; only the "
                                "boundary hands off from a multi-rank stage")
        return ranks[0]

    # Actions that become issuable once a compute finishes (sends, reductions) ------------
    def after_compute(self, stage: int, mb: int, rank: int, done: set) -> list[list[Action]]:
        c = compute_id(stage, mb)
        groups: list[list[Action]] = []
        for consumer in self.stages:
            for payload, producer in consumer.inputs:
                if producer == stage:
                    groups += [pair(rank, q, stage, consumer.kind, mb, payload, (c,))
                               for q in consumer.ranks if q != rank]
        if stage == StageKind.EXPERTS:
            groups += self._hand_off(mb, rank, done)
        return groups

    def _hand_off(self, mb: int, rank: int, done: set) -> list[list[Action]]:
        b, c = self.boundary, compute_id(StageKind.EXPERTS, mb)
        done.add((StageKind.EXPERTS, mb, rank))
        senders = b.senders(self.group, self.out)
        if not b.reduces:
            if rank in senders and rank != self.out:
                return [pair(rank, self.out, StageKind.EXPERTS, StageKind.OUTPUT, mb, b.payload, (c,))]
            return []
        if not all((StageKind.EXPERTS, mb, r) in done for r in self.group):
            return []
        red = [Action(r, Kind.REDUCE, StageKind.EXPERTS, mb, b.payload, self.group, (c,))
               for r in self.group]
        return [red] + [pair(s, self.out, StageKind.EXPERTS, StageKind.OUTPUT, mb, b.payload, (red[0].key,))
                        for s in senders if s != self.out]

    def compute_deps(self, stage: StageKind, mb: int, rank: int, have: set[ActionId]
                     ) -> tuple[ActionId, ...] | None:
        """Ids the compute consumes, or None while some input is not yet in `rank`'s table."""
        need: list[ActionId] = []
        for payload, producer in self.stages[stage].inputs:
            src = self._producer(producer)
            need.append(compute_id(producer, mb) if src == rank else _recv_id(stage, mb, payload, src))
        if stage == StageKind.OUTPUT:
            need += self._hand_off_deps(mb, rank)
        if any(n not in have for n in need):
            return None
        return tuple(dict.fromkeys(need))

    def _hand_off_deps(self, mb: int, rank: int) -> list[ActionId]:
        b = self.boundary
        local = (ActionId(Kind.REDUCE, StageKind.EXPERTS, mb, b.payload, self.group) if b.reduces
                 else compute_id(StageKind.EXPERTS, mb))
        return [local if s == rank else _recv_id(StageKind.OUTPUT, mb, b.payload, s)
                for s in b.senders(self.group, self.out)]

    # The witness -------------------------------------------------------------------------
    def _work_order(self, ranks: list[int], kind: str) -> dict[int, list[tuple[int, int]]]:
        todo = {}
        for r in ranks:
            work = [(st.kind, mb) for st in self.stages for mb in range(self.m) if r in st.ranks]
            if kind == "gpipe":  # all of an earlier stage before a later one, micro-batch order
                work.sort()
            else:  # as-ready: the oldest micro-batch first; later stage first on ties
                work.sort(key=lambda sm: (sm[1], -sm[0]))
            todo[r] = work
        return todo

    def witness(self, kind: str) -> Table:
        """Event-driven replay with relative costs; emits a global order, split per rank."""
        ranks = sorted({r for st in self.stages for r in st.ranks})
        table: Table = {r: [] for r in ranks}
        have: dict[int, set[ActionId]] = defaultdict(set)
        todo = self._work_order(ranks, kind)
        free_at = {r: 0.0 for r in ranks}
        ready_at: dict[tuple[int, ActionId], float] = {}  # when a produced/received value exists
        done: set = set()
        heap = [(0.0, r) for r in ranks]
        stalled: set[int] = set()

        def emit(a: Action, t: float) -> None:
            table[a.rank].append(a)
            have[a.rank].add(a.key)
            ready_at[(a.rank, a.key)] = t

        while heap:
            now, rank = heapq.heappop(heap)
            pick = self._pick(todo[rank], rank, have[rank], kind, ready_at, now)
            if pick is None:
                stalled.add(rank)
                continue
            s, mb, deps = pick
            start = max([now, free_at[rank]] + [ready_at[(rank, d)] for d in deps])
            if start > now:  # inputs exist but arrive later: come back then
                heapq.heappush(heap, (start, rank))
                continue
            todo[rank].remove((s, mb))
            free_at[rank] = start + self.cost[(s, mb, rank)]
            emit(Action(rank, Kind.COMPUTE, s, mb, deps=deps), free_at[rank])
            for group in self.after_compute(s, mb, rank, done):
                t = max(ready_at[(a.rank, d)] for a in group for d in a.deps)
                for a in group:
                    emit(a, t)
            for r in list(stalled):  # new messages may unblock stalled ranks
                stalled.discard(r)
                heapq.heappush(heap, (max(now, free_at[r]), r))
            if todo[rank]:
                heapq.heappush(heap, (free_at[rank], rank))
        left = {r: w for r, w in todo.items() if w}
        if left:
            raise ScheduleError(f"internal: could not place computes {left}")
        return table

    def _pick(self, work: list[tuple[int, int]], rank: int, have: set[ActionId], kind: str,
              ready_at: dict, now: float):
        """gpipe: the next item of the list, once its inputs are placed. asready: the oldest
        item whose inputs exist by `now`; if none does, the one whose inputs exist first."""
        waiting = None
        for s, mb in work:
            deps = self.compute_deps(StageKind(s), mb, rank, have)
            if deps is None:
                if kind == "gpipe":
                    return None  # gpipe runs its list strictly in order
                continue
            at = max((ready_at[(rank, d)] for d in deps), default=0.0)
            if kind == "gpipe" or at <= now:
                return s, mb, deps
            if waiting is None or at < waiting[0]:
                waiting = (at, (s, mb, deps))
        return None if waiting is None else waiting[1]


def _recv_id(stage: int, mb: int, payload, src: int) -> ActionId:
    return ActionId(Kind.RECV, stage, mb, payload, (src,))
