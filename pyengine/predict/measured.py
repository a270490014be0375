"""Op costs for the simulator from a measured timeline: replaying a run's own op times through
the same simulator says how much of the measured bubble the schedule itself explains."""

from __future__ import annotations

from collections.abc import Callable

from pyengine.core.timeline import Timeline
from pyengine.schedule import Action, Kind, Table


def measured_op_costs(tl: Timeline, table: Table) -> Callable[[Action], float]:
    """Per-action seconds from `tl`. A comm action's window also holds its wait for the partner,
    so a pair (or collective) is charged only the time when all its members were in flight:
    min(end) - max(start) over the members."""
    actions = {(a.rank, a.id): a for acts in table.values() for a in acts}
    spans = {(s.rank, s.name): s for s in tl.spans}
    windows: dict[tuple, tuple[float, float]] = {}
    for key, a in actions.items():
        if a.kind is not Kind.COMPUTE and key in spans:
            k, s = _comm_key(a), spans[key]
            lo, hi = windows.get(k, (float("-inf"), float("inf")))
            windows[k] = (max(lo, s.start_s), min(hi, s.end_s))
    dur = {k: s.duration_s for k, s in spans.items()}
    shortest = {k: max(0.0, hi - lo) for k, (lo, hi) in windows.items()}

    def cost(a: Action) -> float:
        if a.kind is Kind.COMPUTE:
            return dur.get((a.rank, a.id), 0.0)
        return shortest.get(_comm_key(a), 0.0)

    return cost


def _comm_key(a: Action) -> tuple:
    if a.kind is Kind.REDUCE:
        return ("reduce", a.peers, a.payload, a.micro_batch)
    return ("p2p", frozenset((a.rank, a.peers[0])), a.payload, a.micro_batch)
