"""bench_overlap sizes its transfers to the GEMM they hide behind (CPU: the rule only)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_overlap import transfer_mbytes  # noqa: E402


def test_sizes_are_link_bandwidth_times_gemm_time_times_half_one_two():
    sizes = transfer_mbytes(450e9, 2e-3)  # 2 ms GEMM at 450 GB/s: 900 MB fits exactly
    assert sizes == pytest.approx([450e9 * 2e-3 * f / 2**20 for f in (0.5, 1, 2)])
    assert sizes[1] == pytest.approx(858.3, rel=1e-3)


def test_sizes_scale_with_the_gemm_time():
    assert transfer_mbytes(450e9, 4e-3) == pytest.approx([2 * s for s in transfer_mbytes(450e9, 2e-3)])
