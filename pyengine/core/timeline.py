"""Timelines: what ran where and when, and the metrics derived from it.

The same metrics are computed for simulated timelines (simulate.py) and measured ones
(the runtime builds Spans from CUDA events), so a prediction and a measurement can be
compared line by line. Nothing here knows about the simulator or the schedule builder.

Definitions (per rank r, over the window [0, makespan]):
  busy[r]        = length of the union of r's compute-lane spans / makespan
  bubble         = 1 - mean over ranks of busy[r]
  comm[r]        = length of the union of r's comm-lane spans (seconds)
  exposed[r]     = comm-lane time on r not covered by any of r's compute-lane spans
  hidden_comm    = 1 - sum(exposed) / sum(comm)   (1.0 when there is no comm at all)
"""

from __future__ import annotations

from dataclasses import dataclass, field

COMPUTE_LANE = "compute"
COMM_LANE = "comm"


@dataclass(frozen=True, slots=True)
class Span:
    rank: int
    lane: str
    """"compute" or "comm" (a shared-lane run still labels comm actions "comm")."""
    name: str
    """The action id (also the NVTX range name)."""
    kind: str
    """COMPUTE, SEND, RECV or REDUCE."""
    stage: int
    micro_batch: int
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


Interval = tuple[float, float]


def union(intervals: list[Interval]) -> list[Interval]:
    """Merge overlapping or touching intervals; empty ones are dropped."""
    out: list[list[float]] = []
    for a, b in sorted(i for i in intervals if i[1] > i[0]):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def length(intervals: list[Interval]) -> float:
    return sum(b - a for a, b in union(intervals))


def uncovered(intervals: list[Interval], cover: list[Interval]) -> float:
    """Length of the union of `intervals` minus its overlap with the union of `cover`."""
    a_u, c_u = union(intervals), union(cover)
    overlap, j = 0.0, 0
    for a, b in a_u:
        while j < len(c_u) and c_u[j][1] <= a:
            j += 1
        k = j
        while k < len(c_u) and c_u[k][0] < b:
            overlap += min(b, c_u[k][1]) - max(a, c_u[k][0])
            k += 1
    return sum(b - a for a, b in a_u) - overlap


@dataclass(slots=True)
class Timeline:
    spans: list[Span]
    makespan_s: float
    ranks: tuple[int, ...] = field(default=())
    """Ranks that count in the averages; default: every rank that has a span."""

    def __post_init__(self) -> None:
        if not self.ranks:
            self.ranks = tuple(sorted({s.rank for s in self.spans}))

    @classmethod
    def from_spans(cls, spans: list[Span], ranks: tuple[int, ...] = ()) -> Timeline:
        """Shift so the earliest span starts at 0; makespan = last end (for measured spans)."""
        if not spans:
            return cls([], 0.0, ranks)
        t0 = min(s.start_s for s in spans)
        moved = [Span(s.rank, s.lane, s.name, s.kind, s.stage, s.micro_batch,
                      s.start_s - t0, s.end_s - t0) for s in spans]
        return cls(moved, max(s.end_s for s in moved), ranks)

    def lane_intervals(self, rank: int, lane: str) -> list[Interval]:
        return [(s.start_s, s.end_s) for s in self.spans if s.rank == rank and s.lane == lane]

    # ---- per rank ----------------------------------------------------------------------
    def compute_s(self, rank: int) -> float:
        return length(self.lane_intervals(rank, COMPUTE_LANE))

    def comm_s(self, rank: int) -> float:
        return length(self.lane_intervals(rank, COMM_LANE))

    def exposed_comm_s(self, rank: int) -> float:
        return uncovered(self.lane_intervals(rank, COMM_LANE), self.lane_intervals(rank, COMPUTE_LANE))

    def busy(self, rank: int) -> float:
        return self.compute_s(rank) / self.makespan_s if self.makespan_s > 0 else 0.0

    # ---- aggregates ----------------------------------------------------------------------
    def busy_by_rank(self) -> dict[int, float]:
        return {r: self.busy(r) for r in self.ranks}

    def exposed_comm_by_rank(self) -> dict[int, float]:
        return {r: self.exposed_comm_s(r) for r in self.ranks}

    @property
    def bubble_fraction(self) -> float:
        if not self.ranks:
            return 0.0
        return 1.0 - sum(self.busy(r) for r in self.ranks) / len(self.ranks)

    @property
    def utilization(self) -> float:
        """Mean compute-lane busy fraction (= 1 - bubble)."""
        return 1.0 - self.bubble_fraction

    @property
    def exposed_comm_total_s(self) -> float:
        return sum(self.exposed_comm_s(r) for r in self.ranks)

    @property
    def comm_total_s(self) -> float:
        return sum(self.comm_s(r) for r in self.ranks)

    @property
    def hidden_comm_fraction(self) -> float:
        total = self.comm_total_s
        return 1.0 if total <= 0 else 1.0 - self.exposed_comm_total_s / total

    def metrics(self) -> dict:
        """Plain-data summary (JSON-ready)."""
        return {
            "makespan_s": self.makespan_s,
            "busy": {str(r): v for r, v in self.busy_by_rank().items()},
            "bubble_fraction": self.bubble_fraction,
            "utilization": self.utilization,
            "comm_s": {str(r): self.comm_s(r) for r in self.ranks},
            "exposed_comm_s": {str(r): v for r, v in self.exposed_comm_by_rank().items()},
            "exposed_comm_total_s": self.exposed_comm_total_s,
            "hidden_comm_fraction": self.hidden_comm_fraction,
        }

    def to_dict(self) -> dict:
        return {"makespan_s": self.makespan_s, "ranks": list(self.ranks),
                "spans": [{"rank": s.rank, "lane": s.lane, "name": s.name, "kind": s.kind,
                           "stage": s.stage, "micro_batch": s.micro_batch,
                           "start_s": s.start_s, "end_s": s.end_s} for s in self.spans],
                "metrics": self.metrics()}
