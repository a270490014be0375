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
    """Continuous expert counts per GPU (each >= 1, summing to E) that equalise predicted busy
    time (fixed work + experts): water-filling, so a GPU whose fixed work alone exceeds the level
    keeps the minimum of one expert and the others share the rest."""
    e = spec.model.num_experts
    routing = routing or uniform(spec)
    even = tuple(near_even_split(e, len(gpus)))
    trial = with_expert_parallel(spec, gpus, place(even, routing), output)
    per = predict_busy(trial, device, by_stage=True, routing=routing)
    fixed = [sum(v for (r, s), v in per.items() if r == g and s != StageKind.EXPERTS) for g in gpus]
    rate = [per[(g, StageKind.EXPERTS)] / c for g, c in zip(gpus, even)]  # seconds per expert
    floor = [False] * len(gpus)
    while True:
        free = [i for i in range(len(gpus)) if not floor[i]]
        left = e - sum(floor)  # floored GPUs hold one expert each
        level = (left + sum(fixed[i] / rate[i] for i in free)) / sum(1 / rate[i] for i in free)
        counts = [1.0 if floor[i] else (level - fixed[i]) / rate[i] for i in range(len(gpus))]
        low = [i for i in free if counts[i] < 1.0]
        if not low:
            return tuple(counts)
        for i in low:
            floor[i] = True


def round_counts(ideal: tuple[float, ...], total: int) -> tuple[int, ...]:
    """Integers >= 1 summing to `total`, nearest to `ideal` (largest remainders get the rest)."""
    base = [max(1, int(x)) for x in ideal]
    while sum(base) > total:
        i = max((j for j in range(len(base)) if base[j] > 1), key=lambda j: base[j] - ideal[j])
        base[i] -= 1
    for i in sorted(range(len(base)), key=lambda j: base[j] - ideal[j])[:total - sum(base)]:
        base[i] += 1
    return tuple(base)


def count_candidates(spec: DeploymentSpec, device: DeviceProfile, gpus: list[int], output: int,
                     routing: Routing | None = None) -> list[tuple[int, ...]]:
    """Integer count vectors (each >= 1, summing to E) around the balanced optimum, plus the
    near-even split."""
    e, n = spec.model.num_experts, len(gpus)
    if e < n:
        return []
    base = round_counts(balanced_counts(spec, device, gpus, output, routing), e)
    out = {tuple(near_even_split(e, n))}
    for delta in itertools.product((-1, 0, 1), repeat=n):
        c = tuple(b + d for b, d in zip(base, delta))
        if min(c) >= 1 and sum(c) == e:
            out.add(c)
    return sorted(out)


def score(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None = None) -> tuple[float, float]:
    """How good an EP layout looks before simulating it: its bottleneck busy time, then (to
    break ties when the router's GPU is the bottleneck) the spread of the others."""
    busy = predict_busy(spec, device, routing=routing)
    # to the microsecond: a GPU whose work no candidate changes must tie, not win by rounding noise
    return round(max(busy.values()), 6), sum(b * b for b in busy.values())


def ep_specs(spec: DeploymentSpec, device: DeviceProfile, gpus: list[int], output: int,
             routing: Routing | None = None) -> Iterator[tuple[tuple[int, ...], DeploymentSpec]]:
    """(counts, spec) for every candidate count vector that makes a valid spec."""
    routing = routing or uniform(spec)
    for counts in count_candidates(spec, device, gpus, output, routing):
        try:
            yield counts, with_expert_parallel(spec, gpus, place(counts, routing), output)
        except SpecError:
            continue


def ranked_ep_specs(spec: DeploymentSpec, device: DeviceProfile, gpus: list[int], output: int,
                    routing: Routing | None = None) -> list[tuple[tuple[int, ...], DeploymentSpec]]:
    """ep_specs, best first by score (ties by counts): what the search and the layout verdict
    both start from."""
    scored = [(score(c, device, routing), counts, c) for counts, c in ep_specs(spec, device, gpus, output, routing)]
    return [(counts, c) for _, counts, c in sorted(scored, key=lambda x: (x[0], x[1]))]
