"""Proves a table runs before anything executes.

Checks: ids unique per rank; every dependency earlier on the same rank; every SEND matched
by a RECV with the same payload, micro-batch and layer; collectives agreed by their whole group;
the order constraints the caller names (`after`: within one sequence and one layer, chunk j's
attention after chunk j-1's, since it reads what that one cached); and no deadlock when each
rank blocks on every comm action in order (the strictest execution the runtime can see).
Raises ScheduleError naming what is wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyengine.schedule.actions import Action, ActionId, Kind, ScheduleError, Table

Order = tuple[int, ActionId, ActionId]
"""(rank, first, then): on `rank`, action `first` must come before action `then`."""


def check(table: Table, after: Sequence[Order] = ()) -> None:
    for rank, actions in table.items():
        _check_rank(rank, actions, table)
    _check_order(table, after)
    pos = {r: 0 for r in table}
    remaining = sum(len(v) for v in table.values())
    while remaining:
        progressed = False
        for r in table:
            while pos[r] < len(table[r]):
                moved = _try_step(table, pos, table[r][pos[r]])
                if not moved:
                    break
                remaining -= moved
                progressed = True
        if not progressed:
            heads = {r: table[r][pos[r]].id for r in table if pos[r] < len(table[r])}
            raise ScheduleError(f"deadlock: every unfinished rank waits: {heads}")


def _check_order(table: Table, after: Sequence[Order]) -> None:
    index = {r: {a.key: i for i, a in enumerate(acts)} for r, acts in table.items()}
    for rank, first, then in after:
        pos = index.get(rank, {})
        if first not in pos or then not in pos:
            missing = first if first not in pos else then
            raise ScheduleError(f"rank {rank}: {missing} is missing from its table")
        if pos[first] > pos[then]:
            raise ScheduleError(f"rank {rank}: {then} runs before {first}, whose KV-cache entries "
                                "it reads (chunks of one sequence must run in order within a layer)")


def _check_rank(rank: int, actions: list[Action], table: Table) -> None:
    seen: set[ActionId] = set()
    for a in actions:
        if a.rank != rank:
            raise ScheduleError(f"action {a.id} has rank {a.rank} but sits in rank {rank}'s table")
        if a.key in seen:
            raise ScheduleError(f"rank {rank}: action {a.id} appears twice")
        for d in a.deps + a.after:
            if d not in seen:
                raise ScheduleError(f"rank {rank}: {a.id} depends on {d}, which does not come earlier")
        seen.add(a.key)
        for p in a.peers:
            if p not in table:
                raise ScheduleError(f"rank {rank}: {a.id} names rank {p}, which has no table")


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
            if (h.peers, h.message) != (a.peers, a.message):
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
    if h.message != a.message:
        raise ScheduleError(f"message mismatch between ranks {a.rank} and {other}: "
                            f"{a.id} meets {h.id}")
    pos[a.rank] += 1
    pos[other] += 1
    return 2
