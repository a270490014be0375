"""bench_kernels' row arithmetic on CPU (the timing itself needs a GPU): the weight bytes a decode
op streams, the achieved GB/s against a copy rate, and the published figure beside the right row."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from bench_kernels import (add_decode_ratios, add_kv_rate, add_ratios, add_streaming, kv_bytes,  # noqa: E402
                           main, parse_args, torch_align, weight_bytes)


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


def test_decode_suite_sizes_are_the_default():
    args = parse_args(["--decode"])
    assert args.decode and args.seqs == [8, 64, 256] and args.positions == [1024, 4096, 8192]


def test_kv_bytes_and_rate_against_the_copy_rate():
    # the seed model's attention, 64 sequences x 4096 keys in bf16: K and V, 8 kv heads x 128
    assert kv_bytes(64, 4096, 8, 128, 2) == 2 * 64 * 4096 * 8 * 128 * 2 == 1_073_741_824
    row = add_kv_rate({"op": "decode_attention", "ms": 0.5, "kv_bytes": 1_073_741_824}, copy_rate=4000.0)
    assert row["kv_gb_s"] == pytest.approx(1_073_741_824 / 0.5e-3 / 1e9)
    assert row["pct_copy"] == pytest.approx(100 * row["kv_gb_s"] / 4000.0)
    assert "kv_gb_s" not in add_kv_rate({"op": "align", "ms": 0.01}, 4000.0)


def test_decode_ratios_pair_each_row_with_its_baseline():
    rows = [{"op": "decode_attention", "size": "8x1024", "provider": "triton", "ms": 0.02},
            {"op": "decode_attention", "size": "8x1024", "provider": "sdpa", "ms": 0.05},
            {"op": "align", "size": "pairs=8", "provider": "triton", "ms": 0.004},
            {"op": "align", "size": "pairs=8", "provider": "torch", "ms": 0.06},
            {"op": "decode_attention", "size": "8x4096", "provider": "triton", "ms": 0.1},
            {"op": "decode_attention", "size": "8x4096", "provider": "sdpa", "error": "no GQA"}]
    add_decode_ratios(rows)
    assert [r["x_baseline"] for r in rows] == [pytest.approx(2.5), pytest.approx(1.0), pytest.approx(15.0),
                                               pytest.approx(1.0), None, None]


def test_torch_align_baseline_on_a_case_worked_by_hand():
    import torch

    from pyengine.kernels.moe_align import empty_alignment

    ids = torch.tensor([[2, 0], [0, -1], [2, 2]], dtype=torch.int32)  # pairs 0..5; pair 3 left out
    out = empty_alignment(6, 3, 2, torch.device("cpu"))
    torch_align(ids, 3, 2, out)
    # expert 0: pairs 1, 2 (one block); expert 1: none; expert 2: pairs 0, 4, 5 (two blocks)
    assert out.sorted_ids[:6].tolist() == [1, 2, 0, 4, 5, 6]
    assert out.expert_ids.tolist()[:3] == [0, 2, 2] and out.num_padded.item() == 6
    assert out.expert_counts.tolist() == [2, 0, 3]
