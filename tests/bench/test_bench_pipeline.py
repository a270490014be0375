"""Smoke test of bench/bench_pipeline.py on CPU: real op timings feed the simulator."""

import json
import os
import subprocess
import sys

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "bench_pipeline.py")
from helpers import TINY_CONFIG as CONFIG  # noqa: E402
import pytest

pytestmark = pytest.mark.slow  # every test here spawns processes


def test_bench_pipeline_json():
    r = subprocess.run([sys.executable, BENCH, "--config", CONFIG, "--iters", "2", "--warmup", "1",
                        "--micro-batches", "1", "4", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["env"]["commit"] and out["env"]["date"] and out["env"]["command"].startswith("python")
    assert out["single_device_s"] > 0
    ms = [row["micro_batches"] for row in out["rows"]]
    assert ms == [3, 1, 4]  # the configured count first, then the requested ones
    for row in out["rows"]:
        assert row["latency_s"] > 0 and 0 <= row["bubble_fraction"] < 1


def test_bench_pipeline_advances_one_bar_step_per_micro_batch_count(monkeypatch, capsys):
    from helpers import RecordingBars

    sys.path.insert(0, os.path.dirname(BENCH))
    import bench_pipeline

    monkeypatch.setattr(bench_pipeline, "progress", recording := RecordingBars())
    assert bench_pipeline.main(["--config", CONFIG, "--iters", "1", "--warmup", "0",
                                "--micro-batches", "1", "2"]) == 0
    [bar] = recording.bars
    assert (bar.total, bar.enabled) == (3, True) and bar.steps == [1, 1, 1]
