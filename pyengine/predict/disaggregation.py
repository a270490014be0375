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
from pyengine.predict.prediction import Predicted, predict, predict_busy
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
        v = variant(spec, device, routing, schedule={"micro_batches": m})
        if v is not None:
            by_m[m] = (v.predicted.latency_s, v.predicted.throughput_tokens_per_s, v.balance)
    best = min(by_m, key=lambda m: (by_m[m][0], -by_m[m][1]))
    return PingPong(att, exp, "attention" if att > exp else "experts", balance_of(att, exp), by_m, best)


@dataclass(slots=True)
class Variant:
    """One alternative of a spec (a section's fields replaced), predicted with its two sides."""
    spec: DeploymentSpec
    predicted: Predicted
    attention_s: float
    """As `sides`: the attention side's busy time per batch."""
    experts_s: float
    """As `sides`: the busiest expert GPU's experts-stage busy time per batch."""

    @property
    def balance(self) -> float:
        """attention_s / experts_s (`balance_of`)."""
        return balance_of(self.attention_s, self.experts_s)


def balance_of(attention_s: float, experts_s: float) -> float:
    """attention_s / experts_s, the ping-pong's balance (inf: no expert time)."""
    return attention_s / experts_s if experts_s else float("inf")


def variant(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None,
            **sections: dict) -> Variant | None:
    """spec.replace(**sections) predicted (one batch) with its two sides; None where the spec
    refuses the change (the alternative is left out, not an error: the caller's spec is valid)."""
    try:
        alt = spec.replace(**sections)
    except SpecError:
        return None
    pred, _ = predict(alt, device, routing=routing)
    attention, experts = sides(alt, device, routing)
    return Variant(alt, pred, attention, experts)


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
    # every layer priced as a MoE layer (dense MLP layers hold less: the count errs low) and its KV
    # cache as a full layer's (a sliding layer's ring is smaller: errs low too)
    one = memory_bytes(spec.all_moe(1), device, routing)
    two = memory_bytes(spec.all_moe(2), device, routing)
    most = []
    for r in one:
        per_layer, base = two[r] - one[r], 2 * one[r] - two[r]
        most.append(int((cap - base) // per_layer) if per_layer > 0 else 1 << 30)
    return max(0, min(most))
