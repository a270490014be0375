"""Tile configs for decode-sized expert GEMMs (1-64 tokens per step): the one home of the choice.

At decode an expert sees M = ceil(T * top_k / E) rows or fewer, so a tile taller than 16 rows
(the smallest tl.dot tile on Hopper) is mostly padding, and the GEMM is bound by streaming
the expert weights from HBM. Streaming needs every SM busy: BLOCK_N is the widest that
still gives the grid at least FILL_FACTOR x SM-count programs (rows tiles x column tiles);
when even the narrowest cannot, the narrowest is taken (most programs).
"""

from __future__ import annotations

import re

import torch
import triton

from pyengine.kernels import smem

DECODE_MAX_TOKENS = 64  # token counts up to this take decode_config (above: prefill tiles)
# Token counts per step that `pyengine kernels compile` and bench_kernels check: each
# distinct decode tile of the seed shapes appears among them.
DECODE_TOKENS = (1, 2, 8, 32, 64)
DECODE_BLOCK_M = 16
BLOCK_N_CHOICES = (128, 64, 32, 16)  # widest first
FILL_FACTOR = 2  # programs per SM the grid should reach (latency hiding at weight streaming)
# SM counts by GPU name, for pick_config's no-device decision; unknown names get Hopper's.
SM_COUNTS = {"H100": 132, "H200": 132, "H800": 132, "A100": 108, "B200": 148}
DEFAULT_SMS = 132


def sm_count(gpu: str) -> int:
    """SM count for a GPU name ('NVIDIA H100 80GB HBM3' -> 132)."""
    for key, sms in SM_COUNTS.items():
        if re.search(rf"\b{key}\b", gpu):
            return sms
    return DEFAULT_SMS


def row_tiles(num_tokens: int, top_k: int, E: int, block_m: int = DECODE_BLOCK_M) -> int:
    """Row tiles holding real rows when T * top_k pairs spread evenly over E experts."""
    pairs = max(num_tokens, 1) * top_k
    active = min(E, pairs)
    return active * triton.cdiv(triton.cdiv(pairs, active), block_m)


def grid_programs(num_tokens: int, top_k: int, E: int, N: int, block_n: int) -> int:
    """Programs with work in a launch of BLOCK_M=16 x block_n tiles over N output columns."""
    return row_tiles(num_tokens, top_k, E) * triton.cdiv(N, block_n)


def decode_config(op: str, *, num_tokens: int, top_k: int, E: int, N: int, K: int,
                  dtype: torch.dtype, sms: int, arch: int = 90) -> triton.Config:
    """The decode tile for `op` ("column": N = F_r, K = H; "row": N = H, K = F_r).

    BLOCK_K starts deep (128) so each program streams long contiguous weight rows, with 4
    pipeline stages; both shrink (stages first) until the tile fits `arch`'s shared memory.
    A 16-row tile runs on mma.sync (wgmma needs 64 rows per warpgroup); 4 warps.
    """
    want = FILL_FACTOR * sms
    block_n = next((bn for bn in BLOCK_N_CHOICES
                    if grid_programs(num_tokens, top_k, E, N, bn) >= want), BLOCK_N_CHOICES[-1])
    deepest = min(128, max(16, triton.next_power_of_2(K)))
    for block_k in (deepest, 64, 32):
        for stages in (4, 3, 2):
            cfg = triton.Config({"BLOCK_M": DECODE_BLOCK_M, "BLOCK_N": block_n,
                                 "BLOCK_K": min(block_k, deepest), "GROUP_M": 1},
                                num_warps=4, num_stages=stages)
            if smem.fits(op, cfg, dtype.itemsize, arch):
                return cfg
    return cfg  # 16 x 128 x 32 x 2 stages fits every supported arch
