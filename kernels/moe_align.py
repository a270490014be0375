"""Routing "align": sort (token, expert) pairs by expert, pad each expert's run to block_m.

Pair p = t * k + j is token t's j-th choice (row-major topk_ids). After align, rows
[b * block_m, (b + 1) * block_m) of `sorted_ids` all belong to expert `expert_ids[b]`, so a
grouped-GEMM program reads one expert's weights. Padding rows hold the sentinel T * k.
A pair whose id is -1 (expert parallel: that choice lives on another GPU) is left out: it is in
no run and no count, so the GEMMs never see it.

One Triton launch of one program, no host sync. The program walks the pairs in chunks twice:
first a histogram per expert (counts, padded run starts, num_padded), then each chunk is
sorted by (expert, position) so a pair's rank within its expert is its sorted position minus
its expert's first sorted position, plus the pairs of that expert in earlier chunks: a stable
order without a global sort. Every output element is written exactly once (real rows, each
run's padding rows, the tail), so no write has to be ordered after another. The buffers are
sized by an upper bound, so the GEMM grids are known on the host and the whole shard can be
captured in a CUDA graph; GEMM programs past `num_padded` exit at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pyengine.kernels import tuning
from pyengine.kernels.launch_count import count_launch

MAX_BLOCK_PAIRS = 1024  # pairs per chunk: one in-register bitonic sort of this many keys
# The interpreter's sort costs far more per key at large chunks: smaller chunks keep CPU runs
# fast, and make tests of a few hundred pairs cross several chunks.
MAX_BLOCK_PAIRS_CPU = 256
MAX_PAD_TILE = 8192  # elements of the [experts, padding rows] tile written per step


class MoeAlignment(NamedTuple):
    sorted_ids: torch.Tensor  # (max_padded_rows,) int32 pair ids by expert; padding = T*k
    expert_ids: torch.Tensor  # (max_padded_rows // block_m,) int32; -1 past num_padded
    expert_counts: torch.Tensor  # (E,) int32 pairs routed to each expert
    num_padded: torch.Tensor  # (1,) int32 rows in use (sum of padded runs)
    block_m: int  # run padding; GEMM tiles must divide it


def max_padded_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on sum_e ceil(count_e / block_m) * block_m (a multiple of block_m)."""
    bound = num_pairs + min(num_experts, num_pairs) * (block_m - 1)
    return bound // block_m * block_m


@triton.jit
def _moe_align_kernel(
    topk_ids_ptr,  # (num_pairs,) int32/int64 expert per pair; -1 (or out of range): left out
    sorted_ids_ptr,  # (max_rows,) int32 out
    expert_ids_ptr,  # (max_rows // ALIGN_M,) int32 out
    expert_counts_ptr,  # (E,) int32 out
    num_padded_ptr,  # (1,) int32 out
    num_pairs, E, max_rows,
    ALIGN_M: tl.constexpr, E_PAD: tl.constexpr, BLOCK_PAIRS: tl.constexpr,
    PAD_TILE: tl.constexpr,
):
    bins = tl.arange(0, E_PAD)  # bin E collects left-out pairs and lanes past num_pairs
    lanes = tl.arange(0, BLOCK_PAIRS)
    counts = tl.zeros((E_PAD,), dtype=tl.int32)
    for c0 in range(0, num_pairs, BLOCK_PAIRS):
        counts += tl.histogram(_chunk_experts(topk_ids_ptr, c0, num_pairs, E, BLOCK_PAIRS), E_PAD)
    counts = tl.where(bins < E, counts, 0)
    padded = (counts + ALIGN_M - 1) // ALIGN_M * ALIGN_M
    run_end = tl.cumsum(padded, 0)
    run_start = run_end - padded
    num_padded = tl.sum(padded, 0)
    tl.store(expert_counts_ptr + bins, counts, mask=bins < E)
    tl.store(num_padded_ptr, num_padded)

    seen = tl.zeros((E_PAD,), dtype=tl.int32)  # pairs of each expert in earlier chunks
    for c0 in range(0, num_pairs, BLOCK_PAIRS):
        expert = _chunk_experts(topk_ids_ptr, c0, num_pairs, E, BLOCK_PAIRS)
        hist = tl.histogram(expert, E_PAD)
        first_in_chunk = tl.cumsum(hist, 0) - hist
        key = tl.sort(expert * BLOCK_PAIRS + lanes)  # by expert, then by position: stable
        key_expert = key // BLOCK_PAIRS
        rank = lanes - tl.gather(first_in_chunk, key_expert, 0)
        dest = tl.gather(run_start + seen, key_expert, 0) + rank
        real = key_expert < E
        tl.store(sorted_ids_ptr + dest, c0 + key % BLOCK_PAIRS, mask=real)
        # A run's every block starts with a real pair: that pair names the block's expert.
        tl.store(expert_ids_ptr + dest // ALIGN_M, key_expert, mask=real & (dest % ALIGN_M == 0))
        seen += hist

    # Padding rows at the end of each run: [start + count, start + padded) per expert.
    pad_from = run_start + counts
    pad_len = padded - counts
    cols = tl.arange(0, PAD_TILE // E_PAD)
    for j0 in range(0, ALIGN_M, PAD_TILE // E_PAD):
        j = j0 + cols
        rows = pad_from[:, None] + j[None, :]
        tl.store(sorted_ids_ptr + rows, num_pairs, mask=j[None, :] < pad_len[:, None])
    # The tail past num_padded: sentinel rows, blocks owned by no expert.
    for r0 in range(num_padded, max_rows, BLOCK_PAIRS):
        rows = r0 + lanes
        tl.store(sorted_ids_ptr + rows, num_pairs, mask=rows < max_rows)
    for b0 in range(num_padded // ALIGN_M, max_rows // ALIGN_M, BLOCK_PAIRS):
        blocks = b0 + lanes
        tl.store(expert_ids_ptr + blocks, -1, mask=blocks < max_rows // ALIGN_M)


@triton.jit
def _chunk_experts(topk_ids_ptr, c0, num_pairs, E, BLOCK_PAIRS: tl.constexpr):
    """Expert of each pair in the chunk at c0; E (the left-out bin) for -1, an id out of
    range (never written anywhere) and lanes past num_pairs."""
    offs = c0 + tl.arange(0, BLOCK_PAIRS)
    ids = tl.load(topk_ids_ptr + offs, mask=offs < num_pairs, other=-1).to(tl.int32)
    return tl.where((ids < 0) | (ids >= E), E, ids)


def moe_align_config(num_pairs: int, num_experts: int, block_m: int, on_cpu: bool = False) -> dict:
    """Constexprs and launch options of one align launch (static shapes only)."""
    e_pad = triton.next_power_of_2(num_experts + 1)  # + the left-out bin
    cap = MAX_BLOCK_PAIRS_CPU if on_cpu else MAX_BLOCK_PAIRS
    block_pairs = min(cap, max(16, triton.next_power_of_2(max(num_pairs, 1))))
    pad_tile = max(e_pad, min(MAX_PAD_TILE, e_pad * block_m))
    return dict(ALIGN_M=block_m, E_PAD=e_pad, BLOCK_PAIRS=block_pairs, PAD_TILE=pad_tile,
                num_warps=4 if block_pairs <= 256 else 8)


def empty_alignment(num_pairs: int, num_experts: int, block_m: int,
                    device: torch.device) -> MoeAlignment:
    rows = max_padded_rows(num_pairs, num_experts, block_m)
    i32 = dict(device=device, dtype=torch.int32)
    return MoeAlignment(torch.empty(rows, **i32), torch.empty(rows // block_m, **i32),
                        torch.empty(num_experts, **i32), torch.empty(1, **i32), block_m)


def alignment_view(buffers: MoeAlignment, num_pairs: int) -> MoeAlignment:
    """The leading part of larger buffers (same block_m and E) that an align of num_pairs
    fills: same storage, so its addresses do not change from call to call."""
    rows = max_padded_rows(num_pairs, buffers.expert_counts.numel(), buffers.block_m)
    return buffers._replace(sorted_ids=buffers.sorted_ids[:rows],
                            expert_ids=buffers.expert_ids[:rows // buffers.block_m])


def _moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                          out: MoeAlignment) -> MoeAlignment:
    """Fill `out` (buffers from empty_alignment or alignment_view) from topk_ids [T, k]
    (contiguous) with ids in [0, E), or -1 for a pair to leave out. One launch."""
    num_pairs = topk_ids.numel()
    meta = moe_align_config(num_pairs, num_experts, block_m, topk_ids.device.type == "cpu")
    count_launch()
    _moe_align_kernel[(1,)](topk_ids, out.sorted_ids, out.expert_ids, out.expert_counts,
                            out.num_padded, num_pairs, num_experts, out.sorted_ids.numel(), **meta)
    return out


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """Align topk_ids [T, k] (int32/int64, values in [0, num_experts), or -1: left out) to block_m.

    Ids are not range-checked here (that needs a host sync); moe_expert_shard checks them.
    An id >= num_experts is treated as left out (never written out of bounds).
    """
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids.dtype={topk_ids.dtype}: must be torch.int32 or torch.int64")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids.shape={tuple(topk_ids.shape)}: must be [T, k]")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts}: must be >= 1")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m}: must be a power of two")
    tuning.check_runnable(_moe_align_kernel, topk_ids.device)
    out = empty_alignment(topk_ids.numel(), num_experts, block_m, topk_ids.device)
    return _moe_align_block_size(topk_ids.contiguous(), num_experts, block_m, out)
