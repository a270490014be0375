"""bench/bench_decode.py: the bytes a step must read (hand-computed), the row built from the ranks'
records, the growth and copy-rate columns, and a tiny run end to end on CPU (its rows say so)."""

import json
import sys
from pathlib import Path

import pytest
import torch

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import bench_decode  # noqa: E402

SPEC = load_spec(TINY_CONFIG).replace(model={"num_layers": 2, "num_attention_heads": 4,
                                             "num_key_value_heads": 2, "head_dim": 8})


def test_must_read_counts_each_touched_weight_once_and_the_kv():
    # H 48, F 40, E 5, V 101, heads 4 x 8, kv 2 x 8, fp32 (4 bytes), 2 layers
    attention = 48 * (32 + 32) + 32 * 48 + 2 * 48 + 48 * 5  # wqkv, wo, two norms, router
    expert = 3 * 48 * 40
    touched = {0: {1, 3}, 1: {0, 1, 2}}
    kv = 30 * 2 * 16 * 2  # 30 cached rows, K and V of 16 values each, 2 layers
    head = 48 * 101 + 48
    assert bench_decode.must_read(SPEC, 30, touched) == 4 * (2 * attention + 5 * expert + kv + head)


def test_touched_experts_leave_padding_rows_out():
    routes = {(0, 0): torch.tensor([[1, 3], [-1, -1]]), (0, 1): torch.tensor([[3, 4]]), (1, 0): torch.tensor([[0, 2]])}
    assert bench_decode.touched_experts(routes) == {0: {1, 3, 4}, 1: {0, 2}}


def test_row_takes_the_slowest_rank_and_medians():
    recs = [{"wall": [0.010, 0.020, 0.030], "host": [1e-3] * 3, "device": [2e-3] * 3, "keys": [30] * 3,
             "routes": {}, "launches": 7, "graphs": "eager decode: x"},
            {"wall": [0.012, 0.011, 0.040], "host": [2e-3] * 3, "device": [3e-3] * 3, "keys": [30] * 3,
             "routes": {(0, 0): torch.tensor([[1, 2]])}, "launches": 5, "graphs": "eager decode: x"}]
    r = bench_decode.row(SPEC, 4, 1, "eager", recs)
    assert r["ms_per_step"] == pytest.approx(20.0) and r["tokens_per_s"] == pytest.approx(200.0)
    assert r["host_us"] == {"0": pytest.approx(1000.0), "1": pytest.approx(2000.0)}
    assert r["launches"] == {"0": 7, "1": 5}
    assert r["must_read_bytes"] == bench_decode.must_read(SPEC, 30, {0: {1, 2}})
    rows = [dict(r, sequences=8), dict(r, sequences=16, ms_per_step=30.0)]
    bench_decode.add_rates(rows, 100.0, on_gpu=False)
    assert [x["growth_vs_8"] for x in rows] == [1.0, 1.5]
    assert rows[0]["pct_copy"] == pytest.approx(100 * rows[0]["read_gb_s"] / 100.0)
    assert rows[0]["note"] == bench_decode.CPU_NOTE


def test_a_tiny_run_on_cpu(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(SPEC.to_json())
    assert bench_decode.main(["--config", str(config), "--sequences", "1", "3", "--groups", "2",
                              "--prompt", "3", "--steps", "2", "--count", "--json"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert "commit" in lines[0]["env"] and lines[0]["env"]["copy_gb_s"] is None
    rows = lines[1:]
    assert [(r["sequences"], r["groups"], r["mode"]) for r in rows] == [(3, 2, "eager"), (3, 2, "graphed")]
    assert all(r["note"] == bench_decode.CPU_NOTE and r["launches"]["0"] > 0 for r in rows)
    assert rows[1]["graphs"].startswith("eager decode: CUDA graphs need a GPU")
