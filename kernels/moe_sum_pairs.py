"""The deterministic k-sum of the row GEMM: y[t] = sum_j per_pair[t * k + j], cast to y's dtype.

moe_row_down (deterministic mode) writes each (token, choice) pair's weighted fp32 row to its
own row of `per_pair` [T*k, H]. This kernel adds a token's k rows in the fixed order j = 0..k-1
in fp32 and rounds once to the output dtype: one launch for the sum and the cast, the same
bits on every run. With skip_ids, a pair whose id is -1 (held by another GPU) was never
written by the row GEMM: it is skipped here, so `per_pair` needs no zeroing launch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyengine.kernels import tuning
from pyengine.kernels.launch_count import count_launch

MAX_BLOCK_H = 1024


@triton.jit
def _moe_sum_pairs_kernel(
    per_pair_ptr,  # (T * TOP_K, H) fp32
    topk_ids_ptr,  # (T * TOP_K,) int32/int64; read only when SKIP_IDS
    out_ptr,  # (T, H)
    H, stride_pair, stride_out,
    TOP_K: tl.constexpr, SKIP_IDS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = offs < H
    acc = tl.zeros((BLOCK_H,), dtype=tl.float32)
    for j in tl.static_range(TOP_K):  # fixed order: deterministic
        pair = tok * TOP_K + j
        mask = in_row
        if SKIP_IDS:  # the id broadcast over the row: a pair held elsewhere reads nothing
            mask = mask & (tl.load(topk_ids_ptr + pair + tl.zeros_like(offs)) >= 0)
        acc += tl.load(per_pair_ptr + pair * stride_pair + offs, mask=mask, other=0.0)
    tl.store(out_ptr + tok * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=in_row)


def moe_sum_pairs_config(H: int) -> dict:
    """Constexpr tile and launch options for rows of H (static)."""
    block_h = min(MAX_BLOCK_H, triton.next_power_of_2(H))
    return dict(BLOCK_H=block_h, num_warps=max(1, min(4, block_h // 256)))


def _launch_sum_pairs(per_pair, topk_ids, out, top_k: int, skip_ids: bool) -> torch.Tensor:
    """The launch alone (no checks): per_pair [T*k, H] fp32 (unit stride along H),
    topk_ids contiguous [T, k], out [T, H] (unit stride along H)."""
    T, H = out.shape
    if T == 0:
        return out
    meta = moe_sum_pairs_config(H)
    count_launch()
    _moe_sum_pairs_kernel[(T, triton.cdiv(H, meta["BLOCK_H"]))](
        per_pair, topk_ids, out, H, per_pair.stride(0), out.stride(0),
        TOP_K=top_k, SKIP_IDS=skip_ids, **meta)
    return out


def moe_sum_pairs(per_pair: torch.Tensor, topk_ids: torch.Tensor, dtype: torch.dtype, *,
                  skip_ids: bool = False) -> torch.Tensor:
    """y [T, H] in `dtype` from per_pair [T*k, H] fp32 and topk_ids [T, k] (-1 skipped when
    skip_ids)."""
    if per_pair.dtype != torch.float32 or per_pair.dim() != 2 or per_pair.stride(1) != 1:
        raise ValueError(f"per_pair: dtype {per_pair.dtype}, shape {tuple(per_pair.shape)}, "
                         f"strides {per_pair.stride()}: must be float32 [T*k, H], unit stride along H")
    if topk_ids.dim() != 2 or topk_ids.numel() != per_pair.shape[0]:
        raise ValueError(f"topk_ids.shape={tuple(topk_ids.shape)}: must be [T, k] with "
                         f"T*k = per_pair.shape[0] = {per_pair.shape[0]}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids.dtype={topk_ids.dtype}: must be torch.int32 or torch.int64")
    tuning.check_runnable(_moe_sum_pairs_kernel, per_pair.device)
    T, k = topk_ids.shape
    out = torch.empty(T, per_pair.shape[1], device=per_pair.device, dtype=dtype)
    return _launch_sum_pairs(per_pair, topk_ids.contiguous(), out, k, skip_ids)
