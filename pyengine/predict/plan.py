"""What `pyengine plan` returns: per-GPU and per-stage predictions, baselines and verdicts."""

from __future__ import annotations

from typing import Any
from dataclasses import asdict, dataclass, field

from pyengine.core.spec import DeploymentSpec
from pyengine.core.timeline import Timeline
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.disaggregation import PingPong
from pyengine.predict.prediction import Baseline, Predicted


@dataclass(slots=True)
class GpuPlan:
    index: int
    parts: list[str]
    """Model parts on this GPU (embed+router, an expert shard, output head)."""
    flops: float
    """FLOPs per batch."""
    weight_bytes: int
    weights: dict[str, int]
    activation_bytes: int
    memory_bytes: int
    """weights + activations + reserved."""
    memory_fraction: float
    """memory_bytes / hardware.gpu_memory_gb."""
    memory_share: float
    """This GPU's share of the model's weights + activations over all GPUs."""
    fits: bool
    sent_bytes: int
    """Per batch, all peers (ring collective traffic counted as sent to the ring successor)."""
    recv_bytes: int
    sent_per_peer: dict[int, float]
    """Per micro-batch (batch total / m), by destination."""
    recv_per_peer: dict[int, float]
    busy_s: float
    """Predicted compute-lane time per batch (sum of the roofline op times)."""
    comm_s: float
    """Predicted comm-lane time per batch."""
    flop_share: float
    busy_share: float
    kv_cache_bytes: int = 0
    """Every layer's keys and values of the batch (the attention GPU; included in memory_bytes)."""


@dataclass(slots=True)
class StagePlan:
    index: int
    name: str
    gpus: list[int]
    flops: float
    weight_bytes: int
    activation_bytes: int
    """Working set of the largest micro-batch, summed over the stage's GPUs."""
    sent_bytes: int
    busy_s: float
    """Per batch: the slowest of the stage's GPUs."""


@dataclass(slots=True)
class Verdict:
    claim: str
    figure: str
    holds: bool | None
    """True, False, or None when it holds against one baseline but not the other."""
    text: str


@dataclass(slots=True)
class LayoutOption:
    """One experts-stage layout predicted at this spec's micro-batches and schedule."""

    label: str
    latency_s: float
    throughput_tokens_per_s: float
    this: bool
    """True for the spec's own layout."""


@dataclass(slots=True)
class DecodePlan:
    new_tokens: int
    first_step_s: float
    """One decode step at the prompts' length (the first decode step)."""
    last_step_s: float
    """One decode step at prompt + new_tokens - 1."""
    mean_step_s: float
    """Mean over the steps (step time is linear in the position: the mean of first and last)."""
    tokens_per_s: float
    """Sequences / mean step time: the batch's decode throughput."""
    weight_bytes_per_step: dict[int, float]
    """Per expert GPU: expected expert weight bytes streamed per step."""
    by_groups: dict[int, float] = field(default_factory=dict)
    """Group count m -> mean step time."""
    best_groups: int = 1
    layouts: list[tuple[str, float, bool]] = field(default_factory=list)
    """(layout, mean step time, this config's own) for the spec's layout and its alternatives."""
    host: Any = None
    """pyengine.predict.host.StepHost of the mean step: host vs device time per rank, eager and graphed."""

@dataclass(slots=True)
class Plan:
    spec: DeploymentSpec
    device: DeviceProfile
    gpus: list[GpuPlan]
    stages: list[StagePlan]
    predicted: Predicted
    baselines: list[Baseline]
    verdicts: list[Verdict]
    balanced_fractions: dict[int, float] | None
    """F fractions for experts on every GPU that equalise predicted busy time (None if infeasible)."""
    timeline: Timeline = field(repr=False)
    layouts: list[LayoutOption] = field(default_factory=list)
    """The spec's experts layout and its alternatives (TP vs EP, the router's GPU included)."""
    routing: dict = field(default_factory=dict)
    """What expert-parallel costs assumed: source (uniform | measured), per-expert loads, imbalance."""
    ping_pong: PingPong | None = None
    """A model of layers: which side (attention or experts) bounds the pipeline, and which m balances it."""
    layers_fit: int | None = None
    """A model of layers: the most layers this layout holds in hardware.gpu_memory_gb per GPU."""
    decode: DecodePlan | None = None
    """A model of layers: decode steps after this batch's prompts, predicted."""
    mlp_placement: Any = None
    """A model with a shared expert or dense layers: pyengine.predict.mlp_placement.MlpPlacements
    (both parallel.dense_mlp_placement values predicted)."""

    @property
    def load_balance(self) -> dict:
        shares = [g.flop_share for g in self.gpus]
        busy = [g.busy_share for g in self.gpus]
        return {"shares": shares, "max_diff_pct": 100 * (max(shares) - min(shares)),
                "busy_shares": busy, "busy_max_diff_pct": 100 * (max(busy) - min(busy))}

    @property
    def fits(self) -> bool:
        return all(g.fits for g in self.gpus)

    def to_dict(self) -> dict:
        return {
            "config": self.spec.to_dict(),
            "device": self.device.to_dict(),
            "gpus": [_jsonable(asdict(g)) for g in self.gpus],
            "stages": [asdict(s) for s in self.stages],
            "load_balance": self.load_balance,
            "module_division": {"parts_per_gpu": {str(g.index): g.parts for g in self.gpus},
                                "total_parts": sum(len(g.parts) for g in self.gpus)},
            "memory": {"capacity_gb": self.spec.hardware.gpu_memory_gb, "fits": self.fits},
            "predicted": asdict(self.predicted),
            "baselines": [asdict(b) for b in self.baselines],
            "verdicts": [asdict(v) for v in self.verdicts],
            "balanced_fractions": (None if self.balanced_fractions is None
                                   else {str(r): f for r, f in self.balanced_fractions.items()}),
            "layouts": [asdict(o) for o in self.layouts],
            "routing": self.routing,
            "ping_pong": None if self.ping_pong is None else {
                **asdict(self.ping_pong), "by_m": {str(m): list(v) for m, v in self.ping_pong.by_m.items()}},
            "layers_fit": self.layers_fit,
            "mlp_placement": None if self.mlp_placement is None else self.mlp_placement.to_dict(),
            "decode": None if self.decode is None else {
                **asdict(self.decode), "by_groups": {str(m): v for m, v in self.decode.by_groups.items()},
                "weight_bytes_per_step": {str(r): v for r, v in self.decode.weight_bytes_per_step.items()},
                "host": None if self.decode.host is None else {
                    "device_step_s": self.decode.host.device_step_s,
                    "eager_step_s": self.decode.host.step_s(False),
                    "graphed_step_s": self.decode.host.step_s(True),
                    "ranks": {str(r): {**asdict(h), "eager": h.bound(False), "graphed": h.bound(True)}
                              for r, h in self.decode.host.ranks.items()}}},
        }


def _jsonable(d: dict) -> dict:
    for key in ("sent_per_peer", "recv_per_peer"):
        d[key] = {str(k): v for k, v in d[key].items()}
    return d
