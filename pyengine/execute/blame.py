"""Which rank caused a failure: the dead, the silent or the stalled one, never a waiting peer.

Read the liveness board (pyengine.execute.liveness) when a failure surfaces, in this order:
  1. dead     a rank that exited or was killed before the launcher stopped anything;
  2. silent   a rank process stopped (SIGSTOP: state T in /proc) or whose heartbeat is older
              than SILENT_S (a frozen process: no thread of it runs);
  3. stalled  a running rank that is working, not waiting, the longest in one action (an
              endless kernel: its heartbeat is fine but it never reaches its next action).
Ranks waiting on a peer and ranks that failed because a wait timed out or a connection closed
are bystanders. A rank that raised a real error (anything but such a wait) is its own cause.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pyengine.execute.liveness import FAILED, RUNNING, Board, Record
from pyengine.execute.procs import RankFailure

SILENT_S = 3.0
"""A heartbeat (every HEARTBEAT_S) older than this marks a rank process as silent."""
NOTICED_CHARS = 120
"""Characters of the noticing rank's own error kept after the headline."""


@dataclass(frozen=True, slots=True)
class Verdict:
    rank: int
    action: str
    reason: str

    def headline(self, noticed: str = "") -> str:
        where = f" in action {self.action}" if self.action else ""
        return f"rank {self.rank} failed{where}: {self.reason}" + (f"; {noticed}" if noticed else "")


def short(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= NOTICED_CHARS else line[:NOTICED_CHARS] + "..."


def find_cause(records: Sequence[Record], *, dead: Mapping[int, str], frozen: set[int] = frozenset(),
               stall_s: float = 0.0, now: float | None = None) -> Verdict | None:
    """The rank to blame (see the module docstring), or None when none is visible yet.
    `dead`: rank -> how its process ended while it was running, in the order seen; `frozen`:
    stopped ranks; `stall_s`: how long a working rank must have been in one action to count
    as stalled (the per-action timeout: a peer waited that long on something)."""
    now = time.monotonic() if now is None else now
    by_rank = {r.rank: r for r in records}
    for rank, how in dead.items():
        return Verdict(rank, _where(by_rank.get(rank)), how)
    silent = [r for r in records if (r.rank in frozen and r.state in (0, RUNNING))
              or (r.running and r.beat and now - r.beat > SILENT_S)]
    if silent:
        r = min(silent, key=lambda x: x.beat)
        how = ("stopped (SIGSTOP or a debugger): its process is not running" if r.rank in frozen
               else f"went silent: no heartbeat for {now - r.beat:.1f} s (process frozen)")
        return Verdict(r.rank, _where(r), how)
    busy = [r for r in records if r.running and not r.waiting and r.count > 0
            and now - r.since >= stall_s]
    if busy:
        r = min(busy, key=lambda x: x.since)
        return Verdict(r.rank, r.action, f"stalled: no progress for {now - r.since:.1f} s "
                                         "while its peers waited on it")
    return None


def _noticer(records: Sequence[Record], rank: int | None, noticed: str, culprit: int) -> str:
    """How the failure was seen: 'rank 0 noticed while waiting on s2.mb1.RECV.partial<-1'."""
    if rank is None or rank == culprit:
        return ""
    rec = next((r for r in records if r.rank == rank), None)
    if rec is not None and rec.wait_on:
        return f"rank {rank} noticed while waiting on {rec.wait_on}"
    return f"rank {rank} noticed: {short(noticed)}"


def _where(rec: Record | None) -> str:
    if rec is None or not rec.action:
        return ""
    return f"{rec.action} (waiting on {rec.wait_on})" if rec.waiting else rec.action


def idle_for(records: Sequence[Record], now: float | None = None) -> float:
    """Seconds since any running rank last changed its record (0 when none is running)."""
    now = time.monotonic() if now is None else now
    running = [r for r in records if r.running]
    return min((now - r.since for r in running), default=0.0)


def explain(board: Board, noticed_by: int | None, noticed: str, *, dead: Mapping[int, str],
            frozen: set[int] = frozenset(), stall_s: float = 0.0,
            final: bool) -> tuple[int | None, str] | None:
    """(rank to blame, headline) for a failure that `noticed_by` reported as `noticed` (None:
    the job's own limit): the true cause when visible; the report itself when it is its own
    cause, or when `final` and nothing better is known; else None (ask again shortly: a death,
    a silence or a stall may not show yet)."""
    records = board.records()
    state = {r.rank: r.state for r in records}
    # A process that ended while its record said "running" crashed or was killed; one that
    # ended after raising (failed / waited) is not a death to blame.
    crashed = {r: how for r, how in dead.items() if state.get(r, 0) in (0, RUNNING)}
    if noticed_by is not None and noticed_by not in crashed and state.get(noticed_by) == FAILED:
        return noticed_by, f"rank {noticed_by} failed: {noticed}"  # its error names its action
    # the job's own idle limit (noticed_by None) already waited longer than any stall
    verdict = find_cause(records, dead=crashed, frozen=frozen,
                         stall_s=0.0 if noticed_by is None else stall_s)
    if verdict is not None:
        return verdict.rank, verdict.headline(_noticer(records, noticed_by, noticed, verdict.rank))
    if not final:
        return None
    erred = [r for r in records if r.state == FAILED]  # its own report has not arrived first
    if erred:
        r = erred[0]
        return r.rank, Verdict(r.rank, r.action, "raised an error of its own").headline(
            _noticer(records, noticed_by, noticed, r.rank))
    who = "job" if noticed_by is None else f"rank {noticed_by}"
    return noticed_by, f"{who} failed: {noticed}"


class BoardWatch:
    """pyengine.execute.procs' Watch over a liveness board: fails a job that made no progress
    for `idle_s` and names the true cause of a failure."""

    def __init__(self, board: Board, idle_s: float, stall_s: float):
        self.board, self.idle_s, self.stall_s = board, idle_s, stall_s

    def stalled(self) -> str | None:
        idle = idle_for(self.board.records())
        if idle > self.idle_s:
            return f"no rank made progress for {idle:.0f} s (limit {self.idle_s:g} s)"
        return None

    def blame(self, failure: RankFailure, dead: Mapping[int, str], frozen: set[int],
              final: bool) -> RankFailure | None:
        found = explain(self.board, failure.rank, failure.reason, dead=dead, frozen=frozen,
                        stall_s=self.stall_s, final=final)
        if found is None:
            return None
        rank, headline = found
        return RankFailure(rank, failure.reason, headline)
