"""bench_serve's row arithmetic against figures worked by hand, and its seeded workload."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_serve import RequestResult, percentile, summarize, workload  # noqa: E402


def test_percentile_interpolates_between_closest_ranks():
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 99) == pytest.approx(4.96)
    assert percentile([7.0], 99) == 7.0 and percentile([], 50) == 0.0


def test_summarize_in_vllm_columns():
    a = RequestResult(10, 3, True, ttft_s=0.1, latency_s=0.5, itl_s=[0.2, 0.2])
    b = RequestResult(6, 1, True, ttft_s=0.3, latency_s=0.3, itl_s=[])
    failed = RequestResult(5, 0, False, error="HTTP 503")
    row = summarize([a, b, failed], duration_s=2.0)
    assert (row["completed"], row["failed"]) == (2, 1)
    assert (row["total_input_tokens"], row["total_output_tokens"]) == (16, 4)  # the failed one not counted
    assert row["request_throughput"] == 1.0 and row["output_throughput"] == 2.0 and row["total_token_throughput"] == 10.0
    assert row["mean_ttft_ms"] == pytest.approx(200.0) and row["median_ttft_ms"] == pytest.approx(200.0)
    assert row["mean_tpot_ms"] == pytest.approx(200.0)  # (500 - 100) / 2 for a; b has one id: no TPOT
    assert row["mean_itl_ms"] == pytest.approx(200.0) and row["p99_itl_ms"] == pytest.approx(200.0)


def test_workload_is_seeded_bounded_and_poisson():
    w = workload(400, 4.0, 20, 10, 0.5, 37, seed=3)
    assert w == workload(400, 4.0, 20, 10, 0.5, 37, seed=3)
    assert all(10 <= len(p) <= 30 and 5 <= n <= 15 and all(3 <= t < 37 for t in p) for _, p, n in w)
    gaps = [b[0] - a[0] for a, b in zip(w, w[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.25, rel=0.15)  # mean gap 1 / rate
    assert all(at == 0.0 for at, _, _ in workload(5, math.inf, 4, 4, 0.0, 37, seed=0))
