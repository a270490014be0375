"""Routing "align": sort (token, expert) pairs by expert, pad each expert's run to block_m.

Pair p = t * k + j is token t's j-th choice (row-major topk_ids). After align, rows
[b * block_m, (b + 1) * block_m) of `sorted_ids` all belong to expert `expert_ids[b]`, so a
grouped-GEMM program reads one expert's weights. Padding rows hold the sentinel T * k.
A pair whose id is -1 (expert parallel: that choice lives on another GPU) is left out: it is in
no run and no count, so the GEMMs never see it.

Plain torch ops, no host sync: a stable sort (CUB radix sort on GPU, a few us for the
seed's 2048 pairs), searchsorted for run bounds, cumsum for offsets, one scatter. The
buffers are sized by an upper bound, so the GEMM grids are known on the host and the whole
shard can be captured in a CUDA graph; programs past `num_padded` exit at once.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


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


def _moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int,
                          out: MoeAlignment) -> MoeAlignment:
    """Fill `out` (buffers from empty_alignment) from topk_ids [T, k] with ids in [0, E), or -1
    for a pair to leave out."""
    flat = topk_ids.reshape(-1)
    num_pairs = flat.numel()
    dev = flat.device
    # Left-out pairs sort after every expert (key E): no run, no count. Stable: pairs of one
    # expert keep token order, so the result is deterministic.
    key = torch.where(flat < 0, num_experts, flat)
    experts_sorted, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(experts_sorted, torch.arange(num_experts + 1, device=dev,
                                                             dtype=experts_sorted.dtype))
    counts = bounds[1:] - bounds[:-1]
    padded_end = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)
    padded_start = padded_end - (counts + block_m - 1) // block_m * block_m
    left_out = experts_sorted >= num_experts
    expert = experts_sorted.long().clamp(max=num_experts - 1)
    dest = padded_start[expert] + torch.arange(num_pairs, device=dev) - bounds[expert]
    # A left-out pair writes the sentinel (the largest value) to row 0 under a min: a no-op
    # whatever lands there, with no host sync to drop it and no order dependence.
    dest = torch.where(left_out, 0, dest)
    value = torch.where(left_out, num_pairs, order).to(torch.int32)
    out.sorted_ids.fill_(num_pairs)
    out.sorted_ids.scatter_reduce_(0, dest, value, reduce="amin")
    block_start = torch.arange(out.expert_ids.numel(), device=dev, dtype=padded_end.dtype) * block_m
    # The first expert whose padded run ends after the block start owns the block.
    owner = torch.searchsorted(padded_end, block_start, right=True)
    out.expert_ids.copy_(torch.where(owner < num_experts, owner, -1))
    out.expert_counts.copy_(counts)
    out.num_padded.copy_(padded_end[-1:])
    return out


def empty_alignment(num_pairs: int, num_experts: int, block_m: int,
                    device: torch.device) -> MoeAlignment:
    rows = max_padded_rows(num_pairs, num_experts, block_m)
    i32 = dict(device=device, dtype=torch.int32)
    return MoeAlignment(torch.empty(rows, **i32), torch.empty(rows // block_m, **i32),
                        torch.empty(num_experts, **i32), torch.empty(1, **i32), block_m)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> MoeAlignment:
    """Align topk_ids [T, k] (int32/int64, values in [0, num_experts), or -1: left out) to block_m.

    Ids are not range-checked here (that needs a host sync); moe_expert_shard checks them.
    """
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids.dtype={topk_ids.dtype}: must be torch.int32 or torch.int64")
    if topk_ids.dim() != 2:
        raise ValueError(f"topk_ids.shape={tuple(topk_ids.shape)}: must be [T, k]")
    if num_experts < 1:
        raise ValueError(f"num_experts={num_experts}: must be >= 1")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m={block_m}: must be a power of two")
    out = empty_alignment(topk_ids.numel(), num_experts, block_m, topk_ids.device)
    return _moe_align_block_size(topk_ids, num_experts, block_m, out)
