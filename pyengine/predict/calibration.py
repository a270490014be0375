"""Measurements -> profile numbers: the fits `pyengine calibrate` applies to what it measured on a
GPU, and the same fits that turned published rows into the presets' numbers (pyengine.predict.presets).

A timed call is a `Sample`: the kernels the planner says it launches (pyengine.model.costs) and
the measured seconds. A fit chooses the profile numbers that minimise the sum of squared log
ratios of predicted to measured time (a 10% miss counts the same at 5 us as at 5 ms): a coarse
grid, then golden-section refinement one number at a time. Link and copy fits are closed form.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence

from pyengine.model.costs import KernelCost
from pyengine.predict.device_profile import DeviceProfile

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
    for _ in range(rounds):
        for name in names:
            lo, hi = bounds[name]
            best[name] = golden_min(lambda x: loss({**best, name: x}), lo, hi)
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
