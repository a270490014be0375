"""spec -> per-rank action tables, built from a witness.

The witness is one global sequence in which every SEND sits next to its RECV and every
REDUCE next to its peers; each rank's table is that sequence restricted to the rank, so the
tables are deadlock-free by construction (check() proves it again). The data flow comes from
the stage objects (what each stage consumes from which stage of which layer) and the boundary
(the experts' hand-off, to the next layer's attention or, after the last layer, to the output
head); nothing here knows a stage by number. In a model of layers, a chunk's attention also
depends on the attention of the earlier chunks of its sequence in the same layer (the KV cache).
"""

from __future__ import annotations

import functools
import heapq
from collections import defaultdict

from pyengine.core.spec import DeploymentSpec
from pyengine.model.batch import Batch
from pyengine.model.boundaries import boundary_of
from pyengine.model.stages import StageKind, stages_of
from pyengine.schedule.actions import (Action, ActionId, Kind, ScheduleError, Table, compute_id,
                                       pair)
from pyengine.schedule.check import Order, check

SCHEDULE_KINDS = ("gpipe", "asready")
Item = tuple[int, int | None, int]
"""A compute to place: (stage, layer, micro-batch)."""


def build(spec: DeploymentSpec, kind: str | None = None, batch: Batch | None = None) -> Table:
    """Per-rank action tables for `spec` (kind defaults to spec.schedule.kind) over `batch`
    (default: the spec's own; a decode step or prompts of other lengths pass theirs), checked.
    Each distinct (spec, kind, batch) is built and checked once per process: a plan prices the
    same tables many times over (its verdicts, baselines, decode steps), and a model of many
    layers makes each build costly. The caller gets its own copy of the lists."""
    kind = kind or spec.schedule.kind
    if kind not in SCHEDULE_KINDS:
        raise ScheduleError(f"schedule kind = {kind!r}: must be one of {list(SCHEDULE_KINDS)}")
    table = _built(spec, kind, batch or Batch.of_spec(spec))
    return {r: list(actions) for r, actions in table.items()}


@functools.lru_cache(maxsize=64)
def _built(spec: DeploymentSpec, kind: str, batch: Batch) -> Table:
    flow = _Flow(spec, batch)
    table = flow.witness(kind)
    check(table, flow.kv_constraints())
    return table


def kv_constraints(spec: DeploymentSpec, batch: Batch | None = None) -> list[Order]:
    """The chunk-order constraints check() enforces for this spec and batch."""
    return _Flow(spec, batch or Batch.of_spec(spec)).kv_constraints()


def _order(item: Item) -> tuple[int, int]:
    """(layer, stage) as a position in the model: the block's one layer counts as 0."""
    stage, layer, _ = item
    return (-1 if layer is None else layer, stage)


class _Flow:
    """The data flow of one batch: which compute produces what, and who must receive it."""

    def __init__(self, spec: DeploymentSpec, batch: Batch):
        self.m = batch.micro_batches
        self.stages = stages_of(spec)
        self.boundary = boundary_of(spec)
        self.group = self.stages[StageKind.EXPERTS].ranks
        self.attending = [st for st in self.stages if st.attends]
        self.kv_pairs = batch.kv_order()
        # Relative compute costs only order the witness (who is likely ready first).
        self.cost = {(st.kind, layer, mb, r): st.flops(c.tokens, r, layer, c)
                     for mb, c in enumerate(batch.chunks)
                     for st in self.stages for layer in st.layers() for r in st.ranks}
        # experts layer -> (stage, layer, rank) of the compute that consumes its hand-off
        self.hand_off_to = {src: (st.kind, layer, st.ranks[0]) for st in self.stages
                            for layer in st.layers() for src in st.hand_off_from(layer)}
        # (stage, layer) of a compute -> (consumer, payload) for every compute that reads it,
        # asked once here: scanning every consumer's every layer per compute made a build
        # quadratic in the layer count (100 layers: 2 million inputs() calls per build)
        self.consumers: dict[tuple[int, int | None], list] = defaultdict(list)
        for consumer in self.stages:
            for cl in consumer.layers():
                for src in consumer.inputs(cl):
                    self.consumers[(src.stage, src.layer)].append((consumer, src.payload))

    def kv_constraints(self) -> list[Order]:
        return [(st.ranks[0], compute_id(st.kind, a, layer), compute_id(st.kind, b, layer))
                for st in self.attending for layer in st.layers() for a, b in self.kv_pairs]

    def _producer(self, stage: StageKind) -> int:
        ranks = self.stages[stage].ranks
        if len(ranks) != 1:
            raise ScheduleError(f"internal: stage {stage.name} has {len(ranks)} ranks; only the "
                                "boundary hands off from a multi-rank stage")
        return ranks[0]

    # Actions that become issuable once a compute finishes (sends, reductions) ------------
    def after_compute(self, stage: int, layer: int | None, mb: int, rank: int, done: set) -> list[list[Action]]:
        c = compute_id(stage, mb, layer)
        groups: list[list[Action]] = []
        for consumer, payload in self.consumers.get((stage, layer), ()):
            groups += [pair(rank, q, stage, consumer.kind, mb, payload, (c,), layer)
                       for q in consumer.ranks if q != rank]
        if stage == StageKind.EXPERTS:
            groups += self._hand_off(layer, mb, rank, done)
        return groups

    def _hand_off(self, layer: int | None, mb: int, rank: int, done: set) -> list[list[Action]]:
        b, c = self.boundary, compute_id(StageKind.EXPERTS, mb, layer)
        dst_stage, _, dst = self.hand_off_to[layer]
        done.add((StageKind.EXPERTS, layer, mb, rank))
        senders = b.senders(self.group, dst)
        if not b.reduces:
            if rank in senders and rank != dst:
                return [pair(rank, dst, StageKind.EXPERTS, dst_stage, mb, b.payload, (c,), layer)]
            return []
        if not all((StageKind.EXPERTS, layer, mb, r) in done for r in self.group):
            return []
        red = [Action(r, Kind.REDUCE, StageKind.EXPERTS, mb, b.payload, self.group, (c,), layer)
               for r in self.group]
        return [red] + [pair(s, dst, StageKind.EXPERTS, dst_stage, mb, b.payload, (red[0].key,), layer)
                        for s in senders if s != dst]

    def compute_deps(self, stage: StageKind, layer: int | None, mb: int, rank: int,
                     have: set[ActionId]) -> tuple[tuple[ActionId, ...], tuple[ActionId, ...]] | None:
        """(ids the compute consumes, ids it must follow), or None while some is not yet in
        `rank`'s table."""
        need: list[ActionId] = []
        st = self.stages[stage]
        for src in st.inputs(layer):
            p = self._producer(src.stage)
            need.append(compute_id(src.stage, mb, src.layer) if p == rank
                        else _recv_id(stage, mb, src.payload, p, src.layer))
        for src_layer in st.hand_off_from(layer):
            need += self._hand_off_deps(stage, src_layer, mb, rank)
        after = [compute_id(stage, a, layer) for a, b in self.kv_pairs if b == mb] if st.attends else []
        if any(n not in have for n in need + after):  # the KV cache: earlier chunks of its sequences first
            return None
        return tuple(dict.fromkeys(need)), tuple(after)

    def _hand_off_deps(self, stage: StageKind, layer: int | None, mb: int, rank: int) -> list[ActionId]:
        b = self.boundary
        local = (ActionId(Kind.REDUCE, StageKind.EXPERTS, mb, b.payload, self.group, layer) if b.reduces
                 else compute_id(StageKind.EXPERTS, mb, layer))
        return [local if s == rank else _recv_id(stage, mb, b.payload, s, layer)
                for s in b.senders(self.group, rank)]

    # The witness -------------------------------------------------------------------------
    def _work_order(self, ranks: list[int], kind: str) -> dict[int, list[Item]]:
        todo = {}
        for r in ranks:
            work = [(st.kind, layer, mb) for st in self.stages for layer in st.layers()
                    for mb in range(self.m) if r in st.ranks]
            if kind == "gpipe":  # all of an earlier layer and stage before a later one, in micro-batch order
                work.sort(key=lambda it: (_order(it), it[2]))
            else:  # as-ready: the oldest micro-batch first; the later layer / stage first on ties
                work.sort(key=lambda it: (it[2], tuple(-x for x in _order(it))))
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
            item, (deps, after) = pick
            s, layer, mb = item
            start = max([now, free_at[rank]] + [ready_at[(rank, d)] for d in deps + after])
            if start > now:  # inputs exist but arrive later: come back then
                heapq.heappush(heap, (start, rank))
                continue
            todo[rank].remove(item)
            free_at[rank] = start + self.cost[(s, layer, mb, rank)]
            emit(Action(rank, Kind.COMPUTE, s, mb, deps=deps, layer=layer, after=after), free_at[rank])
            for group in self.after_compute(s, layer, mb, rank, done):
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

    def _pick(self, work: list[Item], rank: int, have: set[ActionId], kind: str, ready_at: dict, now: float):
        """gpipe: the next item of the list, once its inputs are placed. asready: the oldest
        item whose inputs exist by `now`; if none does, the one whose inputs exist first."""
        waiting = None
        for item in work:
            s, layer, mb = item
            deps = self.compute_deps(StageKind(s), layer, mb, rank, have)
            if deps is None:
                if kind == "gpipe":
                    return None  # gpipe runs its list strictly in order
                continue
            at = max((ready_at[(rank, d)] for d in deps[0] + deps[1]), default=0.0)
            if kind == "gpipe" or at <= now:
                return item, deps
            if waiting is None or at < waiting[0]:
                waiting = (at, (item, deps))
        return None if waiting is None else waiting[1]


def _recv_id(stage: int, mb: int, payload, src: int, layer: int | None = None) -> ActionId:
    return ActionId(Kind.RECV, int(stage), mb, payload, (src,), layer)
