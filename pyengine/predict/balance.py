"""F splits for the expert stage that balance predicted busy time or minimise latency."""

from __future__ import annotations

from pyengine.core.spec import DeploymentSpec, SpecError
from pyengine.model.stages import StageKind
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.prediction import predict, predict_busy


def with_experts(spec: DeploymentSpec, group: list[int], frac: dict[int, float] | None,
                 output: int | None = None) -> DeploymentSpec:
    """`spec` with the experts tensor-parallel over `group` (F fractions `frac`, None = even)
    and the output head on `output` (default: where it is)."""
    st = [{"name": "embed", "gpus": list(spec.stage("embed").gpus)},
          {"name": "experts", "gpus": list(group), "tensor_parallel_size": len(group),
           "shard_fractions": None if frac is None else round_fractions([frac[r] for r in group])},
          {"name": "output", "gpus": [spec.stage("output").gpus[0] if output is None else output]}]
    return spec.replace(parallel={"stages": st})


def round_fractions(fr: list[float]) -> list[float]:
    """Round to 4 decimals, the last one absorbing the remainder, so they sum to 1."""
    out = [round(f, 4) for f in fr[:-1]]
    out.append(round(1.0 - sum(out), 6))
    return out


def balanced_fractions(spec: DeploymentSpec, device: DeviceProfile, group: list[int] | None = None,
                       iterations: int = 4) -> dict[int, float] | None:
    """F fractions for the experts group (default: every GPU) that equalise the predicted
    per-batch busy time of its GPUs, given what else each runs. None if some GPU's other
    work already exceeds the balanced level (it should not hold experts then)."""
    group = list(group if group is not None else range(spec.hardware.num_gpus))
    if len(group) == 1:
        return {group[0]: 1.0}
    frac = {r: 1.0 / len(group) for r in group}
    for _ in range(iterations):
        try:
            trial = with_experts(spec, group, frac)
        except SpecError:  # a shard would get no column of F
            return None
        per = predict_busy(trial, device, by_stage=True)
        fixed = {r: sum(v for (rr, s), v in per.items() if rr == r and s != StageKind.EXPERTS)
                 for r in group}
        rate = {r: per[(r, StageKind.EXPERTS)] / frac[r] for r in group}  # seconds for all of F on r
        # fixed_r + f_r * rate_r = c for all r, sum f_r = 1
        inv = sum(1.0 / rate[r] for r in group)
        c = (1.0 + sum(fixed[r] / rate[r] for r in group)) / inv
        new = {r: (c - fixed[r]) / rate[r] for r in group}
        if min(new.values()) <= 1.0 / spec.model.ffn_hidden_size:
            return None
        frac = new
    total = sum(frac.values())
    return {r: frac[r] / total for r in group}


def latency_fractions(spec: DeploymentSpec, device: DeviceProfile, group: list[int], output: int,
                      steps: int = 10) -> dict[int, float] | None:
    """F fractions that minimise predicted one-batch latency when the output GPU also holds
    an expert shard: its output head runs after its own shard, so it should hold less.
    A grid over the output GPU's share (the others split the rest evenly); None when the
    output GPU is not in the group (the even split is then the symmetric optimum)."""
    n = len(group)
    if output not in group or n == 1:
        return None
    best: tuple[float, dict[int, float]] | None = None
    lo, hi = 0.02, 1.0 / n
    for i in range(steps):
        x = lo + (hi - lo) * i / (steps - 1)
        fr = {r: (x if r == output else (1 - x) / (n - 1)) for r in group}
        try:
            trial = with_experts(spec, group, fr, output)
        except SpecError:  # a shard would get no column of F
            continue
        lat = predict(trial, device)[0].latency_s
        if best is None or lat < best[0]:
            best = (lat, fr)
    return None if best is None else best[1]
