"""The ping-pong of a model of layers, measured: per GPU busy and idle time, and the balance of
the two sides (attention busy / busiest expert GPU's experts busy), beside the same figures from
the simulator's replay of this run's op times and from the planner's roofline for this device."""

from __future__ import annotations

from dataclasses import dataclass

from pyengine.core.spec import DeploymentSpec
from pyengine.core.timeline import COMPUTE_LANE, Timeline, length
from pyengine.model.stages import StageKind


@dataclass(slots=True)
class PingPongSummary:
    busy_s: dict[str, float]
    """Per rank: compute-lane busy seconds in the last timed iteration."""
    idle_s: dict[str, float]
    """Per rank: makespan minus busy."""
    balance: float
    """Measured attention busy / busiest expert GPU's experts busy (1.0: both sides equally busy)."""
    balance_replayed: float
    """The same from the simulator's replay of this run's op times."""
    balance_predicted: float | None
    """The planner's roofline prediction on `profile` (None: no profile for this device)."""
    profile: str


def side_busy(tl: Timeline) -> tuple[float, float]:
    """(attention side busy s, busiest expert GPU's expert busy s) of a timeline."""
    def busy(rank: int, stage: int) -> float:
        return length([(s.start_s, s.end_s) for s in tl.spans
                       if s.rank == rank and s.lane == COMPUTE_LANE and s.stage == stage])

    attention = sum(busy(r, StageKind.EMBED) for r in tl.ranks)
    experts = max((busy(r, StageKind.EXPERTS) for r in tl.ranks), default=0.0)
    return attention, experts


def _ratio(pair: tuple[float, float]) -> float:
    return pair[0] / pair[1] if pair[1] > 0 else float("inf")


def summarize_ping_pong(spec: DeploymentSpec, measured: Timeline, replayed: Timeline,
                        device: str) -> PingPongSummary:
    from pyengine.predict.devices import PRESETS
    from pyengine.predict.disaggregation import ping_pong

    profile = next((name for name in PRESETS if name.upper() in device.upper()), "")
    predicted = ping_pong(spec, PRESETS[profile]).balance if profile else None
    busy = {str(r): measured.compute_s(r) for r in measured.ranks}
    return PingPongSummary(busy, {r: measured.makespan_s - b for r, b in busy.items()},
                           _ratio(side_busy(measured)), _ratio(side_busy(replayed)), predicted, profile)
