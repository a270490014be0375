"""Measurements -> profile numbers: the fits `pyengine calibrate` applies to what it measured on a
GPU, and the same fits that turned published rows into the presets' numbers (pyengine.predict.presets).

A timed call is a `Sample`: the kernels the planner says it launches (pyengine.model.costs) and
the measured seconds. A fit chooses the profile numbers that minimise the sum of squared log
ratios of predicted to measured time (a 10% miss counts the same at 5 us as at 5 ms): a coarse
grid, then golden-section refinement one number at a time. Link and copy fits are closed form.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence

from pyengine.core.collectives import Collective
from pyengine.model.costs import KernelCost
from pyengine.predict.device_profile import DeviceProfile, Source, SourceKind

Sample = tuple[Sequence[KernelCost], float]
"""(kernels of one timed call, its measured seconds)."""

GRID_POINTS = 24
"""Grid points per fitted number before refinement (at most three numbers are fitted at once)."""


def predicted_s(profile: DeviceProfile, kernels: Sequence[KernelCost], dtype: str) -> float:
    return sum(profile.kernel_s(k, dtype) for k in kernels)


def log_error(profile: DeviceProfile, samples: Sequence[Sample], dtype: str) -> float:
    """Sum over samples of log(predicted / measured) squared."""
    return sum(math.log(predicted_s(profile, ks, dtype) / s) ** 2 for ks, s in samples)


def fit_fields(profile: DeviceProfile, samples: Sequence[Sample], dtype: str,
               bounds: Mapping[str, tuple[float, float]], rounds: int = 12) -> dict[str, float]:
    """The values of the fields in `bounds` (each within its [lo, hi]) that best explain `samples`,
    every other number of `profile` held fixed."""
    if not samples:
        raise ValueError("fit_fields: no samples")
    if not 1 <= len(bounds) <= 3:
        raise ValueError(f"fit_fields: fits 1 to 3 numbers at once, got {sorted(bounds)}")

    def loss(values: Mapping[str, float]) -> float:
        return log_error(profile.with_values(**values), samples, dtype)

    names = list(bounds)
    axes = [[lo + (hi - lo) * i / (GRID_POINTS - 1) for i in range(GRID_POINTS)] for lo, hi in bounds.values()]
    best = min((dict(zip(names, point)) for point in itertools.product(*axes)), key=loss)
    def along(start: Mapping[str, float], step: Mapping[str, float], x: float) -> dict[str, float]:
        return {n: min(max(start[n] + x * step[n], bounds[n][0]), bounds[n][1]) for n in names}

    for _ in range(rounds):
        start = dict(best)
        for name in names:
            lo, hi = bounds[name]
            best[name] = golden_min(lambda x: loss({**best, name: x}), lo, hi)
        # then along the round's net move (Powell's step): numbers that trade off against each
        # other (a plateau and its half rows) zigzag slowly one at a time
        step = {n: best[n] - start[n] for n in names}
        if len(names) > 1 and any(step.values()):
            x = golden_min(lambda x: loss(along(start, step, x)), 0.0, 8.0)
            if loss(along(start, step, x)) < loss(best):
                best = along(start, step, x)
    return best


def golden_min(f: Callable[[float], float], lo: float, hi: float, iters: int = 60) -> float:
    """Minimiser of a unimodal f on [lo, hi] by golden-section search."""
    r = (math.sqrt(5) - 1) / 2
    a, b = lo, hi
    c, d = b - r * (b - a), a + r * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - r * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + r * (b - a)
            fd = f(d)
    return (a + b) / 2


def fit_line(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares (intercept, slope) of y = intercept + slope * x."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError(f"fit_line: needs two or more (x, y) pairs, got {len(xs)} x and {len(ys)} y")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("fit_line: every x is the same; the slope is undefined")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - slope * mx, slope


def fit_latency_bandwidth(samples: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """(latency s, bytes/s) of time = latency + bytes / bandwidth over (bytes, seconds) samples
    (a negative intercept, from noise, is taken as 0)."""
    intercept, slope = fit_line([b for b, _ in samples], [s for _, s in samples])
    if slope <= 0:
        raise ValueError(f"fit_latency_bandwidth: time does not grow with size (slope {slope:g} s/byte)")
    return max(0.0, intercept), 1.0 / slope


def copy_efficiency(samples: Sequence[tuple[float, float]], hbm_gb_s: float, launch_s: float) -> float:
    """HBM streaming efficiency from copies: median over (bytes read + written, seconds) samples of
    the rate reached, after the launch, over hbm_gb_s (capped at 1)."""
    rates = [b / max(s - launch_s, 1e-12) for b, s in samples]
    return min(1.0, statistics.median(rates) / (hbm_gb_s * 1e9))


def _measured(what: str) -> Source:
    return Source(SourceKind.MEASURED, f"pyengine calibrate: {what} (this profile's provenance)")


def calibrated_profile(base: DeviceProfile, name: str, dtype: str, *, copy: Sequence[tuple[float, float]],
                       launch_s: float, dense: Sequence[Sample], grouped: Sequence[Sample],
                       sendrecv: Sequence[tuple[float, float]] = (), allreduce: Sequence[tuple[float, float]] = (),
                       allreduce_gpus: int = 0, interconnect: str = "nvlink",
                       provenance: Mapping[str, str] | None = None, host=None) -> DeviceProfile:
    """`base` (a preset: the datasheet peaks) with every number these measurements determine
    replaced, each with a "measured" source; the link numbers only when send/recv and all-reduce
    were timed (on one GPU they keep base's published values and sources). In order: the launch,
    the HBM efficiency from the copies, then (each given those) the dense and the grouped GEMM
    curves, then the link latency (send/recv intercept), efficiency (all-reduce bus bandwidth over
    the line rate) and the collective's fixed latency (all-reduce intercept less its ring steps)."""
    values: dict[str, float] = {"kernel_launch_us": launch_s * 1e6}
    sources = {"kernel_launch_us": _measured("a 1-element add issued back to back")}
    values["hbm_efficiency"] = copy_efficiency(copy, base.hbm_gb_s, launch_s)
    sources["hbm_efficiency"] = _measured(f"device-to-device copies of {_sizes(b / 2 for b, _ in copy)}")
    dev = base.with_values(**values)
    fits = (("gemm", dense, "torch.matmul (cuBLAS) [M, K] @ [K, N] at M = "),
            ("grouped_gemm", grouped, "pyengine.kernels.moe_expert_shard at rows per expert "))
    for prefix, samples, what in fits:
        got = fit_fields(dev, samples, dtype, {f"{prefix}_efficiency": (0.02, 1.0), f"{prefix}_half_rows": (0.0, 4096.0)})
        rows = ", ".join(f"{ks[0].rows:g}" for ks, _ in samples)
        values.update(got)
        sources.update({k: _measured(f"fit to {what}{rows}") for k in got})
        dev = dev.with_values(**got)
    if sendrecv:
        latency, _ = fit_latency_bandwidth(sendrecv)
        values[f"{interconnect}_latency_us"] = latency * 1e6
        sources[f"{interconnect}_latency_us"] = _measured(f"intercept of send/recv time vs size, {_sizes(b for b, _ in sendrecv)}")
    if allreduce:
        ring = Collective.ALL_REDUCE
        latency, busbw = fit_latency_bandwidth([(ring.bus_factor(allreduce_gpus) * b, s) for b, s in allreduce])
        line = getattr(base, f"{interconnect}_gb_s") * 1e9
        values["link_efficiency"] = min(1.0, busbw / line)
        values["collective_base_us"] = max(0.0, latency * 1e6 - ring.ring_steps(allreduce_gpus) * base.collective_step_us)
        what = f"ring all-reduce over {allreduce_gpus} GPUs, {_sizes(b for b, _ in allreduce)}"
        sources["link_efficiency"] = _measured(f"bus bandwidth (slope) of {what}, over the {interconnect} line rate")
        sources["collective_base_us"] = _measured(f"intercept of {what}, less its ring steps x collective_step_us")
    if host is not None:  # pyengine.execute.calibrate_host.HostMeasurements
        values.update(host_launch_us=host.launch_s * 1e6, graph_replay_us=host.replay_s * 1e6,
                      action_host_us=host.action_s * 1e6)
        sources.update(host_launch_us=_measured("host time per 1-element kernel issued back to back"),
                       graph_replay_us=_measured("host time per replay of a one-kernel CUDA graph"),
                       action_host_us=_measured("rank 0's host time per action of an eager decode step of "
                                                "a small 4-layer model, its launches excluded"))
    return dataclasses.replace(base, name=name, **values, sources={**base.sources, **sources},
                               provenance=dict(provenance or {}))


def _sizes(nbytes) -> str:
    sizes = sorted(nbytes)
    return f"{len(sizes)} sizes from {sizes[0]:.0f} to {sizes[-1]:.0f} B"
