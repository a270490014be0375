"""Decode tile choice (kernels/decode_configs.py): small BLOCK_M, a grid that fills the SMs,
prefill untouched. CPU only: the decision needs no device."""

import pytest
import torch
import triton

from pyengine.kernels import decode_configs as dc
from pyengine.kernels import smem, tuning

SEED = dict(E=8, H=4096, F=7168, top_k=2)  # the seed's TP=2 expert shard
SMS = 132  # H100 / H200


def _no_env(monkeypatch):
    for var in ("PYENGINE_MOE_CONFIG", "PYENGINE_MOE_COLUMN_CONFIG", "PYENGINE_MOE_ROW_CONFIG",
                "PYENGINE_AUTOTUNE"):
        monkeypatch.delenv(var, raising=False)


def _programs(op, T, cfg, E=SEED["E"], k=SEED["top_k"], H=SEED["H"], F=SEED["F"]):
    """Programs with real rows, counted from scratch: active experts x row tiles x column tiles."""
    pairs = T * k
    active = min(E, pairs)
    per_expert = -(-pairs // active)
    rows = active * -(-per_expert // cfg.kwargs["BLOCK_M"])
    N = F if op == "column" else H
    return rows * -(-N // cfg.kwargs["BLOCK_N"])


@pytest.mark.parametrize("op", tuning.OPS)
@pytest.mark.parametrize("T", [1, 2, 8, 16, 32, 64])
def test_decode_config_fills_the_sms(op, T, tmp_path, monkeypatch):
    _no_env(monkeypatch)
    pick = tuning.pick_config(op, gpu="NVIDIA H200", dtype=torch.bfloat16, E=SEED["E"],
                              H=SEED["H"], F=SEED["F"], num_tokens=T, top_k=SEED["top_k"],
                              config_dir=tmp_path)
    cfg = pick.config
    assert pick.source == "default"
    assert cfg.kwargs["BLOCK_M"] <= 16  # M per expert <= 16 at every decode T here
    assert _programs(op, T, cfg) >= 2 * SMS, cfg
    assert smem.fits(op, cfg, 2, 90)


def test_widest_tile_that_fills(monkeypatch):
    """Not just the narrowest: once the grid is full, wider tiles stream longer rows."""
    wide = dc.decode_config("column", num_tokens=64, top_k=2, E=8, N=7168, K=4096,
                            dtype=torch.bfloat16, sms=SMS)
    narrow = dc.decode_config("row", num_tokens=1, top_k=2, E=8, N=4096, K=7168,
                              dtype=torch.bfloat16, sms=SMS)
    assert wide.kwargs["BLOCK_N"] == 128
    assert narrow.kwargs["BLOCK_N"] == 16  # 2 row tiles x 4096 / 16 = 512 programs
    assert dc.decode_config("row", num_tokens=1, top_k=2, E=8, N=4096, K=7168,
                            dtype=torch.bfloat16, sms=8).kwargs["BLOCK_N"] == 128  # few SMs


def test_prefill_choice_unchanged(tmp_path, monkeypatch):
    _no_env(monkeypatch)
    for op in tuning.OPS:
        for T in (dc.DECODE_MAX_TOKENS + 1, 256, 1024):
            pick = tuning.pick_config(op, gpu="NVIDIA H100 80GB HBM3", dtype=torch.bfloat16, E=8,
                                      H=4096, F=7168, num_tokens=T, top_k=2, config_dir=tmp_path)
            assert pick == (tuning.GPU_DEFAULT[op], "default")


def test_unaligned_shapes_keep_their_tile(tmp_path, monkeypatch):
    _no_env(monkeypatch)
    pick = tuning.pick_config("row", gpu="NVIDIA H100", dtype=torch.bfloat16, E=8, H=4096,
                              F=7167, num_tokens=1, top_k=2, config_dir=tmp_path)
    assert pick.config is tuning.GPU_DEFAULT_UNALIGNED["row"]


@pytest.mark.parametrize("name,sms", [("NVIDIA H100 80GB HBM3", 132), ("NVIDIA H200", 132),
                                      ("NVIDIA A100-SXM4-80GB", 108), ("NVIDIA B200", 148),
                                      ("cpu", dc.DEFAULT_SMS)])
def test_sm_count(name, sms):
    assert dc.sm_count(name) == sms


def test_fp32_and_tiny_k_fit():
    for op in tuning.OPS:
        cfg = dc.decode_config(op, num_tokens=7, top_k=2, E=3, N=29, K=40, dtype=torch.float32,
                               sms=SMS)
        assert cfg.kwargs["BLOCK_K"] == triton.next_power_of_2(40)
        assert smem.fits(op, cfg, 4, 90)
