"""bench_kernels' row arithmetic on CPU (the timing itself needs a GPU): the weight bytes a decode
op streams, the achieved GB/s against a copy rate, and the published figure beside the right row."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_kernels import add_ratios, add_streaming, main, parse_args, weight_bytes  # noqa: E402


def test_decode_and_prefill_token_counts_are_the_default():
    assert parse_args([]).tokens == [1, 8, 16, 32, 64, 256, 1024]


def test_weight_bytes_count_the_touched_experts_matrices():
    H, F = 4096, 7168  # the seed's TP=2 shard, bf16: one matrix is 58.7 MB
    assert weight_bytes("shard", 2, H, F, 2) == 2 * 3 * H * F * 2
    assert weight_bytes("column", 8, H, F, 2) == 8 * 2 * H * F * 2
    assert weight_bytes("row", 1, H, F, 2) == H * F * 2
    assert weight_bytes("align", 8, H, F, 2) == 0


def test_streaming_rate_and_published_figure_on_the_shards_triton_row():
    rows = [{"op": "shard", "T": 1, "provider": "triton", "ms": 0.12, "weight_bytes": 352_321_536},
            {"op": "shard", "T": 1, "provider": "loop", "ms": 0.24, "weight_bytes": 352_321_536},
            {"op": "column", "T": 1, "provider": "triton", "ms": 0.08, "weight_bytes": 234_881_024},
            {"op": "shard", "T": 3, "provider": "triton", "ms": 0.2, "weight_bytes": 1}]
    add_ratios(rows, None)
    for r in rows:
        add_streaming(r, copy_rate=3000.0)
    shard, loop, column, unpublished = rows
    assert shard["weight_gb_s"] == pytest.approx(352_321_536 / 0.12e-3 / 1e9)
    assert shard["pct_copy"] == pytest.approx(100 * shard["weight_gb_s"] / 3000.0)
    assert shard["published_us"] == 144.03 and "vLLM PR #24700" in shard["published_source"]
    assert shard["x_published"] == pytest.approx(144.03 / 120.0)
    assert shard["x_loop"] == pytest.approx(2.0)
    assert "published_us" not in loop and "published_us" not in column and "published_us" not in unpublished


def test_without_a_gpu_it_says_so_and_exits_2(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the bench would run")
    assert main([]) == 2
    assert "no CUDA device" in capsys.readouterr().err
