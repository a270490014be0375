"""Attention-expert disaggregation, judged: which side bounds the ping-pong pipeline, by how much,
which micro-batch count balances it, and how many layers fit the layout's memory.

In a model of layers the attention GPU computes, per layer and micro-batch, the residual add,
attention and router; the experts group computes the experts. Micro-batches ping-pong between the
two sides, so the pipeline runs at the pace of the busier side once m is large enough to keep
both busy (MegaScale-Infer's argument): `balance` is attention-side busy time over expert-side
busy time per batch (1.0 = balanced; < 1: the experts bound it). More micro-batches overlap the
two sides better but make every expert re-stream its weights once more per layer, so the m that
balances best is found by predicting each candidate, not assumed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyengine.core.spec import DeploymentSpec, SpecError
from pyengine.model.routing import Routing
from pyengine.model.stages import StageKind
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.prediction import predict, predict_busy
from pyengine.predict.resources import memory_bytes

CANDIDATE_M = (1, 2, 3, 4, 6, 8, 16)


@dataclass(slots=True)
class PingPong:
    attention_s: float
    """Predicted busy time per batch of the attention side (the embed stage's GPU, its own
    attention and router work only)."""
    experts_s: float
    """Predicted busy time per batch of the busiest experts-stage GPU (its experts only)."""
    bound_by: str
    """"attention" or "experts": the side that paces the pipeline."""
    balance: float
    """attention_s / experts_s."""
    by_m: dict[int, tuple[float, float, float]]
    """m -> (latency s, tokens/s, balance) predicted at that micro-batch count."""
    best_m: int
    """The m of the lowest predicted latency (ties: more throughput)."""


def ping_pong(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None = None) -> PingPong:
    att, exp = sides(spec, device, routing)
    by_m: dict[int, tuple[float, float, float]] = {}
    for m in CANDIDATE_M:
        if m > spec.model.tokens:
            continue
        try:
            alt = spec.replace(schedule={"micro_batches": m})
        except SpecError:
            continue
        pred, _ = predict(alt, device, routing=routing)
        a, e = sides(alt, device, routing)
        by_m[m] = (pred.latency_s, pred.throughput_tokens_per_s, a / e if e else float("inf"))
    best = min(by_m, key=lambda m: (by_m[m][0], -by_m[m][1]))
    return PingPong(att, exp, "attention" if att > exp else "experts", att / exp if exp else float("inf"),
                    by_m, best)


def sides(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None) -> tuple[float, float]:
    """(attention side's busy time per batch, the busiest expert GPU's experts-stage busy time)."""
    per = predict_busy(spec, device, by_stage=True, routing=routing)
    attention = sum(v for (r, s), v in per.items() if s == StageKind.EMBED)
    experts = max((v for (r, s), v in per.items() if s == StageKind.EXPERTS), default=0.0)
    return attention, experts


def layers_that_fit(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None = None) -> int:
    """The most decoder layers this layout holds within hardware.gpu_memory_gb per GPU (0: not
    one). Memory is linear in the layer count (each layer adds its weights and its KV cache;
    working sets are per micro-batch), so two evaluations give it exactly."""
    if not spec.model.layered:
        raise ValueError("layers_that_fit needs a model of layers (model.num_layers)")
    cap = spec.hardware.gpu_memory_gb * 1e9
    # every layer priced as a MoE layer (dense MLP layers hold less: the count errs low); a sliding
    # layer holds the KV cache of a full one (the cache is not bounded by the window)
    one = memory_bytes(spec.all_moe(1), device, routing)
    two = memory_bytes(spec.all_moe(2), device, routing)
    most = []
    for r in one:
        per_layer, base = two[r] - one[r], 2 * one[r] - two[r]
        most.append(int((cap - base) // per_layer) if per_layer > 0 else 1 << 30)
    return max(0, min(most))
