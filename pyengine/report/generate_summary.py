"""One generation's figures from the ranks' measurements: time to first token, inter-token latency,
decode throughput, per-GPU busy share and the attention / experts balance in decode, the expert
weight bytes each expert GPU streamed per step and the bandwidth that achieved -- each beside the
simulator's replay of this run's own op times and, where this device has a profile, the
planner's roofline. Every measured figure comes from this run."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from pyengine.core.spec import DeploymentSpec
from pyengine.core.timeline import Span, Timeline
from pyengine.execute.backends import Backend
from pyengine.execute.results import GenerateMeasurement, StepMeasurement
from pyengine.model.batch import Batch
from pyengine.model.stages import StageKind, stages_of
from pyengine.model.tensors import PER_EXPERT, moe_layers
from pyengine.predict.measured import measured_op_costs
from pyengine.predict.simulate import simulate
from pyengine.report.ping_pong import side_busy
from pyengine.schedule import build


@dataclass(slots=True)
class GenerateSummary:
    backend: Backend
    device: str
    scaled: str
    weights: str
    sequences: int
    prompt_tokens: int
    new_tokens: int
    ttft_s: float
    itl_p50_s: float
    itl_p99_s: float
    decode_tokens_per_s: float
    decode_busy: dict[str, float]
    """Per rank: compute-lane busy share of the decode steps' wall time."""
    decode_balance: float
    """Attention busy / busiest expert GPU's experts busy, over the decode steps."""
    weight_bytes_per_step: dict[str, float]
    """Per expert GPU: bytes of expert weights its experts streamed per decode step (the experts
    its micro-batches' tokens chose, once per micro-batch and layer)."""
    weight_gb_s: dict[str, float]
    """Per expert GPU: those bytes over its experts' busy time: the achieved streaming rate."""
    replayed: dict[str, float]
    """The simulator over this run's own op times: ttft_s and the median decode step's itl_s."""
    roofline: dict[str, float] | None
    """The planner's roofline on `profile` for the same prefill and median decode step."""
    profile: str = ""
    read_bytes: dict[int, int] = field(default_factory=dict)
    generated: list[list[int]] = field(default_factory=list)
    graphs: str = ""
    """What the decode steps ran as: captured in CUDA graphs, or eager and why."""

    def to_dict(self) -> dict:
        return asdict(self)


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q)) if xs else float("nan")


def step_timeline(results: list[GenerateMeasurement], i: int) -> Timeline:
    spans = [Span(r.rank, t.lane, t.id, t.kind, t.stage, t.micro_batch, s.t0 + t.start_s, s.t0 + t.end_s)
             for r in results for s in [r.steps[i]] for t in s.times]
    return Timeline.from_spans(spans, tuple(r.rank for r in results))


def whole_timeline(results: list[GenerateMeasurement]) -> Timeline:
    """Every step's actions on one clock (steps run one after another): the generation's trace."""
    spans = [Span(r.rank, t.lane, f"step{i}.{t.id}", t.kind, t.stage, t.micro_batch,
                  s.t0 + t.start_s, s.t0 + t.end_s)
             for r in results for i, s in enumerate(r.steps) for t in s.times]
    return Timeline.from_spans(spans, tuple(r.rank for r in results))


def step_batch(results: list[GenerateMeasurement], i: int) -> Batch:
    """The Batch of step i, rebuilt from what every rank agreed on (lengths and live sequences)."""
    out = next(r for r in results if r.sequences is not None)
    lengths = out.prompt_lengths
    if i == 0:
        return Batch.prefill(lengths, results[0].steps[0].micro_batches, logits_all=False)
    final = [len(s) for s in out.sequences]
    live = [s for s in range(len(lengths)) if final[s] - lengths[s] > i]  # had a token to extend at step i
    return Batch.decode([lengths[s] + i - 1 for s in live], results[0].steps[i].micro_batches, slots=live)


def summarize_generation(spec: DeploymentSpec, results: list[GenerateMeasurement], *, backend: Backend,
                         scaled: str = "", weights: str = "") -> GenerateSummary:
    out = next(r for r in results if r.sequences is not None)
    steps = len(results[0].steps)
    wall = [max(r.steps[i].seconds for r in results) for i in range(steps)]
    decode = wall[1:]
    new = sum(len(s) for s in out.sequences) - sum(out.prompt_lengths)
    decode_tokens = new - len(out.sequences)  # the prefill made each sequence's first one
    tls = [step_timeline(results, i) for i in range(1, steps)]
    busy = {str(r.rank): sum(tl.compute_s(r.rank) for tl in tls) / max(sum(decode), 1e-12) for r in results}
    sides = [side_busy(tl) for tl in tls]
    att, exp = sum(a for a, _ in sides), sum(e for _, e in sides)
    streamed, rates = _streaming(spec, results, tls)
    replay, roof, profile = _predictions(spec, results, out.device)
    return GenerateSummary(
        backend, out.device, scaled, weights, len(out.sequences), sum(out.prompt_lengths), new,
        wall[0], _pct(decode, 50), _pct(decode, 99),
        decode_tokens / sum(decode) if decode else 0.0, busy, att / exp if exp else float("inf"),
        streamed, rates, replay, roof, profile, {r.rank: r.read_bytes for r in results}, out.sequences,
        results[0].graphs)


def _streaming(spec: DeploymentSpec, results: list[GenerateMeasurement], tls: list[Timeline]):
    """Per expert GPU: weight bytes streamed per decode step (its experts that a micro-batch's
    tokens chose, once per micro-batch and layer) and the rate over its experts' busy time."""
    experts = stages_of(spec)[StageKind.EXPERTS]
    router = next((r for r in results if r.steps[0].touched), None)
    if router is None or len(tls) == 0:
        return {}, {}
    moe = len(moe_layers(spec.model))  # the routed experts' bytes only (an MLP shard beside them is not an expert's)
    per_expert = {r: sum(v for n, v in experts.weight_bytes(r).items() if n in PER_EXPERT) / (moe * len(held))
                  for r, held in zip(experts.ranks, spec.expert_placement())}
    placement = dict(zip(experts.ranks, spec.expert_placement()))
    streamed, rates = {}, {}
    for rank in experts.ranks:
        held = set(placement[rank])
        total = sum(len(held.intersection(t)) * per_expert[rank]
                    for s in router.steps[1:] for layer in s.touched for t in layer)
        busy = sum(_stage_busy(tl, rank, StageKind.EXPERTS) for tl in tls)
        streamed[str(rank)] = total / len(tls)
        rates[str(rank)] = total / busy / 1e9 if busy > 0 else float("nan")
    return streamed, rates


def _stage_busy(tl: Timeline, rank: int, stage: int) -> float:
    from pyengine.core.timeline import COMPUTE_LANE, length

    return length([(s.start_s, s.end_s) for s in tl.spans
                   if s.rank == rank and s.lane == COMPUTE_LANE and s.stage == stage])


def _predictions(spec: DeploymentSpec, results: list[GenerateMeasurement], device: str):
    """(replay of this run's op times, roofline on this device's profile or None, profile name)
    for the prefill and the median decode step."""
    from pyengine.predict.devices import PRESETS
    from pyengine.predict.prediction import predict

    steps = len(results[0].steps)
    mid = steps // 2 if steps > 1 else 0
    replay, roof = {}, {}
    profile = next((name for name in PRESETS if name.upper() in device.upper()), "")
    for key, i in (("ttft_s", 0), ("itl_s", mid)):
        if key == "itl_s" and steps == 1:
            continue
        batch = step_batch(results, i)
        table = build(spec, batch=batch)
        tl = step_timeline(results, i)
        replay[key] = simulate(spec, table, op_costs=measured_op_costs(tl, table)).makespan_s
        if profile:
            roof[key] = predict(spec, PRESETS[profile], table=table, batch=batch)[0].latency_s
    return replay, (roof or None), profile
