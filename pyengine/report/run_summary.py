"""One run's figures from the ranks' measurements: latency and throughput per variant, the
measured timeline's metrics beside the simulator's replay of the same measured op times, the
measured load balance, the seed's headline claims against this run's own single-device
baseline, and the output check. Every figure comes from this run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pyengine.core import claims
from pyengine.core.spec import DeploymentSpec
from pyengine.core.timeline import Span, Timeline
from pyengine.execute.backends import Backend
from pyengine.execute.check import LogitsCheck, check_logits
from pyengine.execute.results import RankMeasurement
from pyengine.model.routing import uniform
from pyengine.model.stages import StageKind, stages_of
from pyengine.predict.measured import measured_op_costs
from pyengine.predict.simulate import simulate
from pyengine.report.ping_pong import PingPongSummary, summarize_ping_pong
from pyengine.schedule import build


@dataclass(slots=True)
class VariantSummary:
    latency_p50_s: float
    latency_p99_s: float
    throughput_tokens_per_s: float
    measured: dict
    """The measured timeline's metrics (pyengine.core.timeline.Timeline.metrics)."""
    predicted_from_measured_ops: dict
    """The simulator's replay of the same tables with this run's measured op times."""
    load_balance: dict
    timeline: Timeline
    replayed: Timeline | None = None
    """The simulator's replay of the same tables with this run's op times."""
    latency_iters_s: list[float] = field(default_factory=list)
    """Per timed iteration, the slowest rank's latency (the timeline is the last of them)."""


@dataclass(slots=True)
class SingleSummary:
    latency_p50_s: float
    latency_p99_s: float
    throughput_tokens_per_s: float
    latency_iters_s: list[float] = field(default_factory=list)
    """Per timed iteration, the single-device latency."""


@dataclass(slots=True)
class ClaimResult:
    claim: str
    seed_figure: float
    measured: float
    holds: bool | None
    """None: the spread over iterations straddles the seed figure, too noisy for a verdict."""
    spread: tuple[float, float] | None = None
    """p10 and p90 of the per-iteration figure (None: one figure only, from one timeline)."""
    iterations: int = 0
    """How many per-iteration figures the spread is taken over."""


@dataclass(slots=True)
class RoutingSummary:
    """The router's real choices in this run, beside what the planner assumed (uniform)."""

    expert_pairs: list[list[int]]
    """Per micro-batch, pairs routed to each expert (summed over the layers of a model of layers)."""
    gpu_pairs: dict[str, list[int]]
    """Per experts-stage GPU, per micro-batch: the pairs it computed (all of them under TP)."""
    gpu_pairs_predicted: dict[str, list[float]]
    """The same under the planner's uniform routing."""
    imbalance: float
    """Busiest expert's pairs over the mean, over the batch (1.0 = even)."""


@dataclass(slots=True)
class RunSummary:
    backend: Backend
    device: str
    scaled: str
    tokens_per_batch: int
    variants: dict[str, VariantSummary]
    single: SingleSummary
    check: LogitsCheck
    claims: list[ClaimResult]
    weights: str = ""
    """What the weights were (seeded, or which checkpoint and layer)."""
    read_bytes: dict[int, int] = field(default_factory=dict)
    """Checkpoint bytes each rank read for its own slices (all 0 for seeded weights)."""
    check_read_bytes: int = 0
    """Checkpoint bytes the output rank read again, whole, for the output check."""
    routing: RoutingSummary | None = None
    ping_pong: PingPongSummary | None = None
    """A model of layers: the attention / experts balance of the pipeline variant."""

    def to_dict(self) -> dict:
        """Plain data (timelines become their spans and metrics)."""
        out = {"backend": self.backend, "device": self.device, "scaled": self.scaled,
               "tokens_per_batch": self.tokens_per_batch, "variants": {}}
        for name, v in self.variants.items():
            d = {k: getattr(v, k) for k in v.__slots__ if k not in ("timeline", "replayed")}
            d["timeline"] = v.timeline.to_dict()
            out["variants"][name] = d
        out["single"] = asdict(self.single)
        out["check"] = asdict(self.check)
        out["claims"] = [asdict(c) for c in self.claims]
        out["weights"] = {"source": self.weights, "read_bytes_per_rank": dict(self.read_bytes),
                          "check_read_bytes": self.check_read_bytes}
        out["routing"] = None if self.routing is None else asdict(self.routing)
        out["ping_pong"] = None if self.ping_pong is None else asdict(self.ping_pong)
        return out


def timeline_of(results: list[RankMeasurement], variant: str) -> Timeline:
    spans = [Span(r.rank, t.lane, t.id, t.kind, t.stage, t.micro_batch,
                  v.t0 + t.start_s, v.t0 + t.end_s)
             for r in results for v in [r.variants[variant]] for t in v.times]
    return Timeline.from_spans(spans, tuple(r.rank for r in results if r.variants[variant].times))


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def _variant(spec: DeploymentSpec, results: list[RankMeasurement], name: str) -> VariantSummary:
    per_rank = [r.variants[name] for r in results]
    iters = per_rank[0].iters
    lat = [max(v.latency_s[i] for v in per_rank) for i in range(iters)]
    stream = max(v.stream_s for v in per_rank)
    tl = timeline_of(results, name)
    table = build(spec)
    predicted = simulate(spec, table, op_costs=measured_op_costs(tl, table))
    computes = {r: tl.compute_s(r) for r in tl.ranks}
    total = sum(computes.values()) or 1.0
    balance = {"shares": {str(r): c / total for r, c in computes.items()},
               "max_diff_pct": 100 * (max(computes.values()) - min(computes.values())) / total}
    return VariantSummary(_pct(lat, 50), _pct(lat, 99), per_rank[0].stream_tokens / stream,
                          tl.metrics(), predicted.metrics(), balance, tl, predicted, lat)


def summarize(spec: DeploymentSpec, variant_specs: dict[str, DeploymentSpec],
              results: list[RankMeasurement], *, backend: Backend, scaled: str = "",
              weights: str = "") -> RunSummary:
    out_rank = results[spec.stage("output").gpus[0]]
    tokens = spec.model.tokens
    variants = {name: _variant(vspec, results, name) for name, vspec in variant_specs.items()}
    single = out_rank.single_latency_s
    single_summary = SingleSummary(_pct(single, 50), _pct(single, 99), tokens / _pct(single, 50),
                                   list(single))
    check = check_logits(spec.model.dtype, out_rank.logits, out_rank.reference_logits)
    router = results[spec.stage("embed").gpus[0]]
    pipe = variants["pipeline"]
    return RunSummary(backend, out_rank.device, scaled, tokens, variants, single_summary, check,
                      headline_claims(pipe, single_summary), weights,
                      {r.rank: r.read_bytes for r in results}, out_rank.check_read_bytes,
                      routing_summary(spec, router.expert_counts) if router.expert_counts else None,
                      summarize_ping_pong(spec, pipe.timeline, pipe.replayed, out_rank.device)
                      if spec.model.layered else None)


def routing_summary(spec: DeploymentSpec, counts: list[list[int]]) -> RoutingSummary:
    """Measured per-expert and per-GPU load against the planner's uniform assumption."""
    experts = stages_of(spec)[StageKind.EXPERTS]
    sizes = spec.micro_batch_sizes()
    gpu, predicted = {}, {}
    for rank, held in zip(experts.ranks, spec.expert_placement()):
        gpu[str(rank)] = [sum(c[e] for e in held) for c in counts]
        share = uniform(spec).pair_share(held)
        predicted[str(rank)] = [t * spec.model.top_k * share * spec.model.layers for t in sizes]
    total = [sum(c[e] for c in counts) for e in range(spec.model.num_experts)]
    mean = sum(total) / len(total)
    return RoutingSummary(counts, gpu, predicted, max(total) / mean if mean else 1.0)


SPREAD_PERCENTILES = (10, 90)
"""The spread shown beside each measured ratio, and tested against the seed figure."""


def spread_of(per_iteration: list[float]) -> tuple[float, float] | None:
    if not per_iteration:
        return None
    lo, hi = SPREAD_PERCENTILES
    return _pct(per_iteration, lo), _pct(per_iteration, hi)


def verdict_of(measured: float, target: float, spread: tuple[float, float] | None) -> bool | None:
    """Holds / does not hold by the run's figure, unless its spread over iterations lies on both
    sides of the target: then None, since another run of the same config could give either."""
    if spread is not None and spread[0] < target < spread[1]:
        return None
    return measured >= target


def _per_iteration(p, s, throughput_gain: float) -> dict[str, list[float]]:
    """Each iteration's pipeline latency against the single device's same-numbered iteration: the
    latency cut; and the throughput gain, whose stream is timed once, as the stream's figure scaled
    by that iteration's latency ratio relative to the median one (the batches' noise, both sides)."""
    pairs = list(zip(p.latency_iters_s, s.latency_iters_s))
    ratios = [sl / pl for pl, sl in pairs]
    mid = float(np.median(ratios)) if ratios else 1.0
    return {claims.LATENCY_CUT.key: [1 - 1 / r for r in ratios],
            claims.THROUGHPUT_GAIN.key: [(1 + throughput_gain) * r / mid - 1 for r in ratios]}


def headline_claims(p: VariantSummary, s: SingleSummary) -> list[ClaimResult]:
    """The seed's headline figures against this run (pipeline vs the single-device baseline), each
    with its spread over iterations (utilization comes from one timeline: no spread)."""
    measured = {
        claims.LATENCY_CUT: 1 - p.latency_p50_s / s.latency_p50_s,
        claims.THROUGHPUT_GAIN: p.throughput_tokens_per_s / s.throughput_tokens_per_s - 1,
        claims.UTILIZATION: p.measured["utilization"],
    }
    per_iteration = _per_iteration(p, s, measured[claims.THROUGHPUT_GAIN])
    out = []
    for c in claims.HEADLINE:
        figures = per_iteration.get(c.key, [])
        spread = spread_of(figures)
        out.append(ClaimResult(c.key, c.target, measured[c], verdict_of(measured[c], c.target, spread),
                               spread, len(figures)))
    return out
