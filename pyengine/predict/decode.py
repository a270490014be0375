"""Decode, predicted: the time of one decode step (one new token per sequence, micro-batches of
sequences ping-ponging between the attention GPU and the expert GPUs) as the KV cache grows, the
tokens per second that follow, the expert weight bytes each expert GPU streams per step, the
micro-batch count that decodes fastest and whether TP or EP does.

Each step is simulated through the same tables and roofline as a prefill, over the step's Batch:
attention reads every cached key of its sequences (so steps slow down as positions grow), and
every expert a group's tokens choose streams its weights once per group and layer -- the expected
number under the routing, E (1 - (1 - k/E)^t) for t tokens under uniform routing -- which is why
at decode the experts' side is memory-bound and more groups cost more weight traffic.
"""

from __future__ import annotations

from pyengine.core.spec import DeploymentSpec
from pyengine.model.batch import Batch
from pyengine.model.routing import Routing, uniform
from pyengine.model.stages import StageKind, stages_of
from pyengine.model.tensors import PER_EXPERT
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.host import decode_host
from pyengine.predict.layouts import alternatives, describe
from pyengine.predict.plan import DecodePlan
from pyengine.predict.prediction import predict

CANDIDATE_GROUPS = (1, 2, 3, 4, 6, 8)


def step_s(spec: DeploymentSpec, device: DeviceProfile, position: int, routing: Routing | None = None) -> float:
    """One decode step of every sequence at `position` (tokens already cached)."""
    b = Batch.decode([position] * spec.model.batch_size, spec.schedule.micro_batches)
    return predict(spec, device, routing=routing, batch=b)[0].latency_s


def mean_step_s(spec: DeploymentSpec, device: DeviceProfile, new_tokens: int,
                routing: Routing | None = None) -> tuple[float, float, float]:
    first = step_s(spec, device, spec.model.seq_len, routing)
    last = step_s(spec, device, spec.model.seq_len + new_tokens - 1, routing)
    return first, last, (first + last) / 2


def weight_bytes_per_step(spec: DeploymentSpec, routing: Routing | None = None) -> dict[int, float]:
    experts = stages_of(spec, routing)[StageKind.EXPERTS]
    r = routing or uniform(spec)
    groups = Batch.decode([spec.model.seq_len] * spec.model.batch_size, spec.schedule.micro_batches).sizes()
    out = {}
    for rank, held in zip(experts.ranks, spec.expert_placement()):
        w = experts.weight_bytes(rank)  # every layer's slices
        per_expert = sum(v for n, v in w.items() if n in PER_EXPERT) / len(held)
        mlps = sum(v for n, v in w.items() if n not in PER_EXPERT)  # MLP shards: read by every group
        out[rank] = per_expert * sum(r.experts_touched(held, g) for g in groups) + mlps * len(groups)
    return out


def decode_plan(spec: DeploymentSpec, device: DeviceProfile, new_tokens: int,
                routing: Routing | None = None) -> DecodePlan:
    first, last, mean = mean_step_s(spec, device, new_tokens, routing)
    by = {}
    for m in CANDIDATE_GROUPS:
        if m <= spec.model.batch_size:
            by[m] = mean_step_s(spec.replace(schedule={"micro_batches": m}), device, new_tokens, routing)[2]
    best = min(by, key=lambda m: (by[m], m))
    layouts = [(describe(spec), mean, True)]
    for alt in alternatives(spec, device, routing):
        layouts.append((describe(alt), mean_step_s(alt, device, new_tokens, routing)[2], False))
    host = decode_host(spec, device, spec.model.seq_len + new_tokens // 2)
    return DecodePlan(new_tokens, first, last, mean, spec.model.batch_size / mean,
                      weight_bytes_per_step(spec, routing), by, best, layouts, host)
