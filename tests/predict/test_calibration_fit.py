"""The fits `pyengine calibrate` applies (measurements -> profile numbers), on synthetic
measurements made by hand with a known answer."""

import pytest

from pyengine.model.costs import KernelCost
from pyengine.predict.calibration import (copy_efficiency, fit_fields, fit_latency_bandwidth, fit_line,
                                          golden_min)
from pyengine.predict.devices import PRESETS

H100 = PRESETS["h100"]
PEAK, HBM = 989e12, 3350e9


def _grouped_call(rows_per_expert):
    """One grouped GEMM over 8 experts of H 4096 x F 7168 with `rows_per_expert` rows each."""
    pairs = 8 * rows_per_expert
    return KernelCost.grouped("g", 6.0 * pairs * 4096 * 7168, 8 * 3 * 4096 * 7168 * 2, rows_per_expert)


def _by_hand_s(k, plateau, half, hbm_eff, launch_s):
    eff = plateau * k.rows / (k.rows + half)
    return launch_s + max(k.flops / (PEAK * eff), k.hbm_bytes / (HBM * hbm_eff))


def test_grouped_curve_recovered_from_synthetic_rates():
    """Times made with plateau 0.62 and 150 half rows (HBM 0.9, launch 3 us); the fit, given the
    HBM efficiency and launch, recovers both."""
    dev = H100.with_values(hbm_efficiency=0.9, kernel_launch_us=3.0)
    ks = [_grouped_call(m) for m in (64, 128, 256, 512, 1024, 2048)]
    samples = [([k], _by_hand_s(k, 0.62, 150.0, 0.9, 3e-6)) for k in ks]
    got = fit_fields(dev, samples, "bfloat16", {"grouped_gemm_efficiency": (0.05, 1.0),
                                                "grouped_gemm_half_rows": (0.0, 2000.0)})
    assert got["grouped_gemm_efficiency"] == pytest.approx(0.62, rel=1e-3)
    assert got["grouped_gemm_half_rows"] == pytest.approx(150.0, rel=1e-2)


def test_hbm_and_curve_recovered_together_with_noise():
    """Three numbers at once from rows spanning memory-bound (m <= 128 with these numbers) and
    compute-bound calls, times off by +-1% alternately: each number within a few percent."""
    dev = H100.with_values(kernel_launch_us=3.0)
    ks = [_grouped_call(m) for m in (4, 16, 64, 128, 256, 512, 1024, 2048)]
    samples = [([k], _by_hand_s(k, 0.7, 100.0, 0.85, 3e-6) * (1.01 if i % 2 else 0.99)) for i, k in enumerate(ks)]
    got = fit_fields(dev, samples, "bfloat16", {"hbm_efficiency": (0.5, 1.0), "grouped_gemm_efficiency": (0.05, 1.0),
                                                "grouped_gemm_half_rows": (0.0, 2000.0)})
    assert got["hbm_efficiency"] == pytest.approx(0.85, rel=0.02)
    assert got["grouped_gemm_efficiency"] == pytest.approx(0.7, rel=0.05)
    assert got["grouped_gemm_half_rows"] == pytest.approx(100.0, rel=0.1)


def test_fit_fields_refuses_nothing_to_fit():
    with pytest.raises(ValueError, match="no samples"):
        fit_fields(H100, [], "bfloat16", {"hbm_efficiency": (0.5, 1.0)})
    with pytest.raises(ValueError, match="1 to 3"):
        fit_fields(H100, [([_grouped_call(64)], 1e-3)], "bfloat16", {})


def test_line_and_link_fits():
    xs = [1e3, 1e6, 1e7, 1e8]
    ys = [2e-6 + x / 300e9 for x in xs]  # 2 us + bytes / 300 GB/s
    assert fit_line(xs, ys) == pytest.approx((2e-6, 1 / 300e9), rel=1e-9)
    lat, bw = fit_latency_bandwidth(list(zip(xs, ys)))
    assert (lat, bw) == pytest.approx((2e-6, 300e9), rel=1e-9)
    lat, _ = fit_latency_bandwidth([(1e6, 1e-6), (2e6, 3e-6)])  # intercept -1 us: noise, taken as 0
    assert lat == 0.0
    with pytest.raises(ValueError, match="does not grow"):
        fit_latency_bandwidth([(1e6, 2e-6), (2e6, 1e-6)])
    with pytest.raises(ValueError, match="every x"):
        fit_line([1, 1], [1, 2])


def test_copy_efficiency_is_the_median_rate_over_the_peak():
    # 2 GB read + written: 0.7 ms after a 10 us launch -> 2.857 TB/s of 3.35; the outlier does not count
    samples = [(2e9, 710e-6), (2e9, 710e-6), (2e9, 5e-3)]
    assert copy_efficiency(samples, 3350.0, 10e-6) == pytest.approx(2e9 / 700e-6 / 3350e9)
    assert copy_efficiency([(2e9, 1e-6)], 3350.0, 0.0) == 1.0  # capped


def test_golden_min():
    assert golden_min(lambda x: (x - 0.3) ** 2, 0.0, 1.0) == pytest.approx(0.3, abs=1e-9)
