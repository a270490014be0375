"""Schedules are data: spec -> per-rank action tables, plus a checker run before anything executes.

Each rank issues its actions in table order. COMPUTE actions run on the rank's compute
stream; SEND/RECV/REDUCE on its comm stream, in order (NCCL matches messages between a
pair of ranks by issue order; it has no tags). `deps` name the actions on the same rank
whose results an action consumes: the runtime waits on exactly those.

Tables are built from a witness: one global sequence in which every SEND sits next to its
RECV and every REDUCE next to its peers. Each rank's table is that sequence restricted to
the rank, so the tables are deadlock-free by construction; `check` proves it again for any
table (hand-written or modified ones included).
"""

from __future__ import annotations

import enum
import heapq
from collections import defaultdict
from dataclasses import dataclass

from pyengine import costs
from pyengine.spec import DeploymentSpec


class Kind(str, enum.Enum):
    RECV = "RECV"
    COMPUTE = "COMPUTE"
    SEND = "SEND"
    REDUCE = "REDUCE"


@dataclass(frozen=True, slots=True)
class Action:
    rank: int
    kind: Kind
    stage: int
    """Stage this action belongs to on its rank (0 embed, 1 experts, 2 output)."""
    micro_batch: int
    payload: str = ""
    """What moves: act (u + routing), resid (x), partial, sum (all-reduced), half (reduce-scattered)."""
    peers: tuple[int, ...] = ()
    """SEND: (dst,); RECV: (src,); REDUCE: the group, in rank order."""
    deps: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        """Unique per rank; also the NVTX range name."""
        base = f"s{self.stage}.mb{self.micro_batch}.{self.kind.value}"
        if self.kind is Kind.SEND:
            return f"{base}.{self.payload}->{self.peers[0]}"
        if self.kind is Kind.RECV:
            return f"{base}.{self.payload}<-{self.peers[0]}"
        if self.kind is Kind.REDUCE:
            return f"{base}.{self.payload}@{','.join(map(str, self.peers))}"
        return base


Table = dict[int, list[Action]]


class ScheduleError(ValueError):
    """A table cannot run: unmatched messages, a missing dependency or a deadlock."""


# ---- building ----------------------------------------------------------------------
def build(spec: DeploymentSpec, kind: str | None = None) -> Table:
    """Per-rank action tables for `spec` (kind defaults to spec.schedule.kind)."""
    kind = kind or spec.schedule.kind
    if kind not in ("gpipe", "asready"):
        raise ScheduleError(f"schedule kind = {kind!r}: must be 'gpipe' or 'asready'")
    graph = _Graph(spec)
    table = graph.witness(kind)
    check(table)
    return table


class _Graph:
    """The data flow of one batch: which compute produces what, and who must receive it."""

    def __init__(self, spec: DeploymentSpec):
        self.spec = spec
        self.m = spec.schedule.micro_batches
        self.emb = spec.stage("embed").gpus[0]
        self.out = spec.stage("output").gpus[0]
        self.grp = spec.stage("experts").gpus
        self.boundary = spec.comm.boundary
        cols = costs.shard_cols(spec)
        sizes = spec.micro_batch_sizes()
        # Relative compute costs only order the witness (who is likely ready first).
        self.cost = {}
        for mb, t in enumerate(sizes):
            self.cost[(0, mb, self.emb)] = costs.stage0_flops(spec, t)
            for r in self.grp:
                self.cost[(1, mb, r)] = costs.expert_flops(spec, t, cols[r])
            self.cost[(2, mb, self.out)] = costs.stage2_flops(spec, t)

    # Actions produced right after a compute finishes (sends, reductions) ---------------
    def after_compute(self, stage: int, mb: int, rank: int, done: set) -> list[list[Action]]:
        """Groups of actions (pairs / collectives) that become issuable once (stage, mb, rank) is done."""
        c = _compute_id(stage, mb)
        groups: list[list[Action]] = []
        if stage == 0:
            for r in self.grp:
                if r != rank:
                    groups.append(_pair(rank, r, 0, 1, mb, "act", (c,)))
            if self.out != rank:
                groups.append(_pair(rank, self.out, 0, 2, mb, "resid", (c,)))
        elif stage == 1:
            done.add((1, mb, rank))
            if self.boundary == "partials":
                if rank != self.out:
                    groups.append(_pair(rank, self.out, 1, 2, mb, "partial", (c,)))
            elif all((1, mb, r) in done for r in self.grp):
                groups.extend(self._reduce(mb))
        return groups

    def _reduce(self, mb: int) -> list[list[Action]]:
        payload = "sum" if self.boundary == "all_reduce" else "half"
        red = [Action(r, Kind.REDUCE, 1, mb, payload, self.grp, (_compute_id(1, mb),))
               for r in self.grp]
        groups = [red]
        rid = red[0].id
        if payload == "sum":
            leader = self.out if self.out in self.grp else self.grp[0]
            if leader != self.out:
                groups.append(_pair(leader, self.out, 1, 2, mb, "sum", (rid,)))
        else:
            for r in self.grp:
                if r != self.out:
                    groups.append(_pair(r, self.out, 1, 2, mb, "half", (rid,)))
        return groups

    def compute_deps(self, stage: int, mb: int, rank: int, table: Table) -> tuple[str, ...] | None:
        """Ids the compute consumes, or None while some input is not yet in `rank`'s table."""
        have = {a.id for a in table[rank]}
        need: list[str] = []
        if stage == 1:
            need.append(_compute_id(0, mb) if rank == self.emb else f"s1.mb{mb}.RECV.act<-{self.emb}")
        elif stage == 2:
            need.append(_compute_id(0, mb) if rank == self.emb else f"s2.mb{mb}.RECV.resid<-{self.emb}")
            if self.boundary == "partials":
                need += [_compute_id(1, mb) if r == rank else f"s2.mb{mb}.RECV.partial<-{r}"
                         for r in self.grp]
            elif self.boundary == "all_reduce":
                leader = self.out if self.out in self.grp else self.grp[0]
                red = f"s1.mb{mb}.REDUCE.sum@{','.join(map(str, self.grp))}"
                need.append(red if leader == rank else f"s2.mb{mb}.RECV.sum<-{leader}")
            else:
                red = f"s1.mb{mb}.REDUCE.half@{','.join(map(str, self.grp))}"
                need += [red if r == rank else f"s2.mb{mb}.RECV.half<-{r}" for r in self.grp]
        if any(n not in have for n in need):
            return None
        return tuple(dict.fromkeys(need))

    def witness(self, kind: str) -> Table:
        """Event-driven replay with relative costs; emits a global order, split per rank."""
        ranks = sorted({self.emb, self.out, *self.grp})
        table: Table = {r: [] for r in ranks}
        # Per-rank compute candidates in the order the policy prefers.
        todo = defaultdict(list)
        for r in ranks:
            work = [(s, mb) for s in range(3) for mb in range(self.m)
                    if (s, mb, r) in self.cost]
            if kind == "gpipe":  # all of an earlier stage before a later one, micro-batch order
                work.sort()
            else:  # as-ready: the oldest micro-batch first; later stage first on ties
                work.sort(key=lambda sm: (sm[1], -sm[0]))
            todo[r] = work
        free_at = {r: 0.0 for r in ranks}
        ready_at: dict[tuple[int, str], float] = {}  # when a produced/received value exists
        done: set = set()
        heap = [(0.0, r) for r in ranks]
        stalled: set[int] = set()
        while heap:
            now, rank = heapq.heappop(heap)
            pick = None
            for s, mb in todo[rank]:
                deps = self.compute_deps(s, mb, rank, table)
                if deps is not None:
                    pick = (s, mb, deps)
                    break
                if kind == "gpipe":
                    break  # gpipe runs its list strictly in order
            if pick is None:
                stalled.add(rank)
                continue
            s, mb, deps = pick
            start = max([now, free_at[rank]] + [ready_at[(rank, d)] for d in deps])
            if start > now:  # inputs exist but arrive later: come back then
                heapq.heappush(heap, (start, rank))
                continue
            todo[rank].remove((s, mb))
            compute = Action(rank, Kind.COMPUTE, s, mb, deps=deps)
            table[rank].append(compute)
            free_at[rank] = start + self.cost[(s, mb, rank)]
            ready_at[(rank, compute.id)] = free_at[rank]
            for group in self.after_compute(s, mb, rank, done):
                t = max(ready_at[(a.rank, d)] for a in group for d in a.deps)
                for a in group:
                    table[a.rank].append(a)
                    ready_at[(a.rank, a.id)] = t
            for r in list(stalled):  # new messages may unblock stalled ranks
                stalled.discard(r)
                heapq.heappush(heap, (max(now, free_at[r]), r))
            if todo[rank]:
                heapq.heappush(heap, (free_at[rank], rank))
        left = {r: w for r, w in todo.items() if w}
        if left:
            raise ScheduleError(f"internal: could not place computes {left}")
        return table


def _compute_id(stage: int, mb: int) -> str:
    return f"s{stage}.mb{mb}.COMPUTE"


def _pair(src: int, dst: int, s_stage: int, r_stage: int, mb: int, payload: str,
          deps: tuple[str, ...]) -> list[Action]:
    return [Action(src, Kind.SEND, s_stage, mb, payload, (dst,), deps),
            Action(dst, Kind.RECV, r_stage, mb, payload, (src,))]


# ---- checking ------------------------------------------------------------------------
def check(table: Table) -> None:
    """Prove the table runs: ids unique, deps earlier on the same rank, every SEND matched
    by a RECV with the same payload and micro-batch, collectives agreed by their whole
    group, and no deadlock when each rank blocks on every comm action in order (the
    strictest execution the runtime can see). Raises ScheduleError naming what is wrong."""
    for rank, actions in table.items():
        seen: set[str] = set()
        for a in actions:
            if a.rank != rank:
                raise ScheduleError(f"action {a.id} has rank {a.rank} but sits in rank {rank}'s table")
            if a.id in seen:
                raise ScheduleError(f"rank {rank}: action {a.id} appears twice")
            for d in a.deps:
                if d not in seen:
                    raise ScheduleError(f"rank {rank}: {a.id} depends on {d}, which does not come earlier")
            seen.add(a.id)
            for p in a.peers:
                if p not in table:
                    raise ScheduleError(f"rank {rank}: {a.id} names rank {p}, which has no table")
    pos = {r: 0 for r in table}
    remaining = sum(len(v) for v in table.values())
    while remaining:
        progressed = False
        for r in table:
            while pos[r] < len(table[r]):
                a = table[r][pos[r]]
                moved = _try_step(table, pos, a)
                if not moved:
                    break
                remaining -= moved
                progressed = True
        if not progressed:
            heads = {r: table[r][pos[r]].id for r in table if pos[r] < len(table[r])}
            raise ScheduleError(f"deadlock: every unfinished rank waits: {heads}")


def _head(table: Table, pos: dict[int, int], rank: int) -> Action | None:
    return table[rank][pos[rank]] if pos[rank] < len(table[rank]) else None


def _try_step(table: Table, pos: dict[int, int], a: Action) -> int:
    """Advance `a` (and its partners) if they are all at the head of their tables."""
    if a.kind is Kind.COMPUTE:
        pos[a.rank] += 1
        return 1
    if a.kind is Kind.REDUCE:
        heads = [_head(table, pos, p) for p in a.peers]
        if not all(h is not None and h.kind is Kind.REDUCE for h in heads):
            return 0
        for h in heads:
            if (h.peers, h.payload, h.micro_batch) != (a.peers, a.payload, a.micro_batch):
                raise ScheduleError(f"collective mismatch: rank {a.rank} issues {a.id} "
                                    f"while rank {h.rank} issues {h.id}")
        for p in a.peers:
            pos[p] += 1
        return len(a.peers)
    other = a.peers[0]
    want = Kind.RECV if a.kind is Kind.SEND else Kind.SEND
    h = _head(table, pos, other)
    if h is None or h.kind is not want or h.peers[0] != a.rank:
        return 0
    if (h.payload, h.micro_batch) != (a.payload, a.micro_batch):
        raise ScheduleError(f"message mismatch between ranks {a.rank} and {other}: "
                            f"{a.id} meets {h.id}")
    pos[a.rank] += 1
    pos[other] += 1
    return 2


def format_table(table: Table) -> str:
    return "\n".join(f"rank {r}: " + ", ".join(a.id for a in acts) for r, acts in sorted(table.items()))
