"""Expert-parallel layouts worth predicting: how many whole experts each GPU holds, and which.

The search does not enumerate every assignment of E experts to n GPUs (n^E of them). It solves
the balance in closed form instead: each GPU's predicted busy time is its fixed work (router,
output head) plus its experts' share; the counts that equalise it are rounded and their
integer neighbourhood (+-1 expert per GPU) is kept, so the candidate count stays small for
any E (<= 3^n vectors). Which experts go where: contiguous ranges under uniform routing;
under measured routing a greedy longest-processing-time grouping that fills each GPU's count
with the heaviest experts left, so hot experts spread out.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from pyengine.core.spec import DeploymentSpec, SpecError, near_even_split
from pyengine.model.routing import Routing, uniform
from pyengine.model.stages import StageKind
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.prediction import predict_busy


def with_expert_parallel(spec: DeploymentSpec, gpus: list[int], placement: tuple[tuple[int, ...], ...],
                         output: int | None = None) -> DeploymentSpec:
    """`spec` with whole experts `placement[i]` on `gpus[i]` and the output head on `output`."""
    st = [{"name": "embed", "gpus": list(spec.stage("embed").gpus)},
          {"name": "experts", "gpus": list(gpus), "parallel_mode": "expert",
           "expert_ids": [list(p) for p in placement]},
          {"name": "output", "gpus": [spec.stage("output").gpus[0] if output is None else output]}]
    return spec.replace(parallel={"stages": st})


def place(counts: tuple[int, ...], routing: Routing) -> tuple[tuple[int, ...], ...]:
    """Expert ids per GPU for these counts: contiguous (uniform routing) or load-balanced."""
    if routing.source == "uniform":
        out, start = [], 0
        for c in counts:
            out.append(tuple(range(start, start + c)))
            start += c
        return tuple(out)
    loads = routing.expert_loads()
    held: list[list[int]] = [[] for _ in counts]
    weight = [0.0] * len(counts)
    for e in sorted(range(len(loads)), key=lambda x: (-loads[x], x)):
        open_ = [i for i, c in enumerate(counts) if len(held[i]) < c]
        i = min(open_, key=lambda j: (weight[j] / counts[j], j))  # least loaded per slot
        held[i].append(e)
        weight[i] += loads[e]
    return tuple(tuple(sorted(h)) for h in held)


def balanced_counts(spec: DeploymentSpec, device: DeviceProfile, gpus: list[int], output: int,
                    routing: Routing | None = None) -> tuple[float, ...]:
    """Continuous expert counts per GPU that equalise predicted busy time (fixed work + experts)."""
    e, n = spec.model.num_experts, len(gpus)
    routing = routing or uniform(spec)
    even = tuple(near_even_split(e, n))
    trial = with_expert_parallel(spec, gpus, place(even, routing), output)
    per = predict_busy(trial, device, by_stage=True, routing=routing)
    fixed = [sum(v for (r, s), v in per.items() if r == g and s != StageKind.EXPERTS) for g in gpus]
    rate = [per[(g, StageKind.EXPERTS)] / c for g, c in zip(gpus, even)]  # seconds per expert
    level = (e + sum(f / r for f, r in zip(fixed, rate))) / sum(1 / r for r in rate)
    return tuple(max(0.0, (level - f) / r) for f, r in zip(fixed, rate))


def count_candidates(spec: DeploymentSpec, device: DeviceProfile, gpus: list[int], output: int,
                     routing: Routing | None = None) -> list[tuple[int, ...]]:
    """Integer count vectors (each >= 1, summing to E) around the balanced optimum, plus the
    near-even split."""
    e, n = spec.model.num_experts, len(gpus)
    if e < n:
        return []
    ideal = balanced_counts(spec, device, gpus, output, routing)
    base = [max(1, round(x)) for x in ideal]
    out = {tuple(near_even_split(e, n))}
    for delta in itertools.product((-1, 0, 1), repeat=n):
        c = tuple(b + d for b, d in zip(base, delta))
        if min(c) >= 1 and sum(c) == e:
            out.add(c)
    return sorted(out)


def ep_specs(spec: DeploymentSpec, device: DeviceProfile, gpus: list[int], output: int,
             routing: Routing | None = None) -> Iterator[tuple[tuple[int, ...], DeploymentSpec]]:
    """(counts, spec) for every candidate count vector that makes a valid spec."""
    routing = routing or uniform(spec)
    for counts in count_candidates(spec, device, gpus, output, routing):
        try:
            yield counts, with_expert_parallel(spec, gpus, place(counts, routing), output)
        except SpecError:
            continue
