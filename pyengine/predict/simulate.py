"""Event-driven replay of schedule tables -> Timeline.

Each rank has a compute lane and a comm lane (one shared lane when comm.overlap is False).
Actions on a lane run in table order; an action starts when its lane is free and the actions
it depends on (same rank) have finished. A SEND and its RECV rendezvous: both lanes must have
reached them, they start together and last the same time. A REDUCE starts when every member
of its group has reached it.

Op costs come from the roofline (pyengine.predict.roofline) or from the caller: a mapping
from action id (or (rank, id)) to seconds, or a callable(Action) -> seconds, so a table can
be replayed with measured op times.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pyengine.core.spec import DeploymentSpec
from pyengine.core.timeline import COMM_LANE, COMPUTE_LANE, Span, Timeline
from pyengine.model.routing import Routing
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.roofline import op_costs as roofline_costs
from pyengine.schedule import Action, Kind, ScheduleError, Table, build, check

OpCosts = Mapping[str, float] | Mapping[tuple[int, str], float] | Callable[[Action], float]
SHARED_LANE = "shared"


def simulate(spec: DeploymentSpec | None, table: Table | None = None, op_costs: OpCosts | None = None,
             device: DeviceProfile | str | None = None, *, overlap: bool | None = None,
             routing: Routing | None = None) -> Timeline:
    """Replay `table` (default: schedule.build(spec)) with `op_costs` (default: the roofline
    model of `device`) and return the timeline. `overlap` defaults to spec.comm.overlap
    (True without a spec). A table that cannot run raises ScheduleError."""
    if table is None:
        if spec is None:
            raise ValueError("simulate needs a spec or a table")
        table = build(spec)
    else:
        check(table)
    if op_costs is None:
        if spec is None:
            raise ValueError("simulate needs op_costs when no spec is given")
        cost = roofline_costs(spec, device, routing)
    else:
        cost = _cost_fn(op_costs)
    if overlap is None:
        overlap = spec.comm.overlap if spec is not None else True
    return Simulator(table, cost, overlap).run()


def _cost_fn(op_costs: OpCosts) -> Callable[[Action], float]:
    if callable(op_costs):
        return op_costs

    def lookup(a: Action) -> float:
        for key in ((a.rank, a.id), a.id):
            if key in op_costs:
                return float(op_costs[key])
        raise ValueError(f"op_costs has no entry for rank {a.rank} action {a.id!r} "
                         "(key by action id or (rank, action id))")

    return lookup


LaneKey = tuple[int, str]


class Simulator:
    """One replay of a checked table; `run()` returns its timeline."""

    def __init__(self, table: Table, cost: Callable[[Action], float], overlap: bool):
        self.table, self.cost, self.overlap = table, cost, overlap
        self.lanes: dict[LaneKey, list[Action]] = {}
        for rank in sorted(table):
            for a in table[rank]:
                self.lanes.setdefault(self.lane(a.rank, a.kind), []).append(a)
        self.pos = {key: 0 for key in self.lanes}
        self.free = {key: 0.0 for key in self.lanes}
        self.end: dict[tuple[int, object], float] = {}
        self.spans: list[Span] = []

    def lane(self, rank: int, kind: Kind) -> LaneKey:
        if not self.overlap:
            return (rank, SHARED_LANE)
        return (rank, COMPUTE_LANE if kind is Kind.COMPUTE else COMM_LANE)

    def head(self, key: LaneKey) -> Action | None:
        acts = self.lanes.get(key)
        return acts[self.pos[key]] if acts is not None and self.pos[key] < len(acts) else None

    def partners(self, a: Action) -> list[Action] | None:
        """The group that must start together with `a`, if all are at their lane heads."""
        if a.kind is Kind.COMPUTE:
            return [a]
        if a.kind is Kind.REDUCE:
            heads = [a if p == a.rank else self.head(self.lane(p, Kind.REDUCE)) for p in a.peers]
            return heads if all(h is not None and h.key == a.key for h in heads) else None
        want = Kind.RECV if a.kind is Kind.SEND else Kind.SEND
        h = self.head(self.lane(a.peers[0], want))
        if (h is None or h.kind is not want or h.peers[0] != a.rank
                or (h.payload, h.micro_batch) != (a.payload, a.micro_batch)):
            return None
        return [a, h]

    def deps_done(self, a: Action) -> bool:
        return all((a.rank, d) in self.end for d in a.deps + a.after)

    def start_of(self, a: Action) -> float:
        return max([self.free[self.lane(a.rank, a.kind)]] + [self.end[(a.rank, d)] for d in a.deps + a.after])

    def execute(self, group: list[Action]) -> None:
        duration = max(float(self.cost(g)) for g in group)
        start = max(self.start_of(a) for a in group)
        for a in group:
            key = self.lane(a.rank, a.kind)
            self.free[key] = start + duration
            self.pos[key] += 1
            self.end[(a.rank, a.key)] = start + duration
            self.spans.append(Span(a.rank, COMPUTE_LANE if a.kind is Kind.COMPUTE else COMM_LANE,
                                   a.id, a.kind.value, a.stage, a.micro_batch, start, start + duration))

    def run(self) -> Timeline:
        remaining = sum(len(v) for v in self.lanes.values())
        while remaining:
            progressed = False
            for key in self.lanes:
                while (a := self.head(key)) is not None:
                    group = self.partners(a)
                    if group is None or not all(self.deps_done(g) for g in group):
                        break
                    self.execute(group)
                    remaining -= len(group)
                    progressed = True
            if not progressed:
                heads = {f"{k[0]}/{k[1]}": self.head(k).id for k in self.lanes if self.head(k) is not None}
                raise ScheduleError(f"simulation cannot progress; lane heads: {heads}")
        makespan = max((s.end_s for s in self.spans), default=0.0)
        self.spans.sort(key=lambda s: (s.rank, s.lane, s.start_s))
        return Timeline(self.spans, makespan, tuple(sorted(self.table)))
