"""MLA's per-token preparation in one launch: q's rotary part turned, the KV latent normed, the
shared rotary key turned, and [latent | key] written into the paged latent cache.

Inputs are the projections' outputs: q [n, heads, nope + rope] (a @ wq, or the low-rank path's
q_b output) and kv [n, kv_lora + rope] (a @ wkv_a). One program serves one (row, head) for
head < heads: q_out[row, head] = [q_nope | rope(q_pe)]; program (row, heads) normalises the latent
c (RMSNorm over kv_lora, weights kv_a_norm), turns k_pe and writes [c | k_pe] at the row's
position in the row's slot (block block_table[slot, pos // block_size], row pos % block_size).
A padding row (slot -1) writes nothing to the cache and zeros to q_out.

Numerics, as pyengine.model.attention_mla orders them in torch: the norm in fp32,
x * rsqrt(mean(x^2) + eps) * w, rounded once to the model dtype; RoPE (rotate-half: pair
(i, i + r/2) turns by angle position * inv_freq[i], YaRN's factor folded into the tables) from
fp32 cos/sin tables, in fp32, rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyengine.kernels import paged_checks, tuning
from pyengine.kernels.launch_count import count_launch

MAX_LATENT = 2048  # kv_lora_rank a program normalises in one tile
MAX_ROPE = 256


@triton.jit
def _mla_rope_cache_kernel(
    q_ptr,  # (n, heads, nope + rope)
    kv_ptr,  # (n, kv_lora + rope)
    positions_ptr, slots_ptr,  # (n,) int32 each
    block_table_ptr,  # (num_slots, max_blocks) int32
    cache_ptr,  # (num_blocks, block_size, 1, kv_lora + rope)
    cos_ptr, sin_ptr,  # (max_positions, rope // 2) fp32 each
    norm_ptr,  # (kv_lora,)
    q_out_ptr,  # (n, heads, nope + rope)
    eps, stride_qn, stride_qh, stride_kv, stride_bt, stride_cb, stride_cr, stride_on, stride_oh,
    HEADS: tl.constexpr, NOPE: tl.constexpr, ROPE: tl.constexpr, LORA: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_NOPE: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_LORA: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    HALF: tl.constexpr = ROPE // 2
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    j = tl.arange(0, BLOCK_NOPE)
    j_ok = j < NOPE
    out_ty = q_out_ptr.dtype.element_ty
    is_q = head < HEADS
    out = q_out_ptr + row * stride_on + head * stride_oh
    if slot < 0:  # padding row: no cache write; q_out zeros
        if is_q:
            tl.store(out + j, tl.zeros((BLOCK_NOPE,), tl.float32).to(out_ty), mask=j_ok)
            tl.store(out + NOPE + i, tl.zeros((BLOCK_HALF,), tl.float32).to(out_ty), mask=i_ok)
            tl.store(out + NOPE + HALF + i, tl.zeros((BLOCK_HALF,), tl.float32).to(out_ty), mask=i_ok)
        return
    pos = tl.load(positions_ptr + row).to(tl.int64)
    cos = tl.load(cos_ptr + pos * HALF + i, mask=i_ok, other=0.0)
    sin = tl.load(sin_ptr + pos * HALF + i, mask=i_ok, other=0.0)
    # q head h: its rotary part follows its nope part; the latent program: k_pe follows c
    if is_q:
        x_ptr = q_ptr + row * stride_qn + head * stride_qh + NOPE
    else:
        x_ptr = kv_ptr + row * stride_kv + LORA
    x1 = tl.load(x_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    r1 = (x1 * cos - x2 * sin).to(out_ty)
    r2 = (x2 * cos + x1 * sin).to(out_ty)
    if is_q:
        tl.store(out + j, tl.load(q_ptr + row * stride_qn + head * stride_qh + j, mask=j_ok), mask=j_ok)
        tl.store(out + NOPE + i, r1, mask=i_ok)
        tl.store(out + NOPE + HALF + i, r2, mask=i_ok)
    else:
        c_i = tl.arange(0, BLOCK_LORA)
        c_ok = c_i < LORA
        c = tl.load(kv_ptr + row * stride_kv + c_i, mask=c_ok, other=0.0).to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(c * c, 0) / LORA + eps)
        w = tl.load(norm_ptr + c_i, mask=c_ok, other=0.0).to(tl.float32)
        page = tl.load(block_table_ptr + slot.to(tl.int64) * stride_bt + pos // PAGE).to(tl.int64)
        at = cache_ptr + page * stride_cb + (pos % PAGE) * stride_cr
        tl.store(at + c_i, (c * rstd * w).to(out_ty), mask=c_ok)
        tl.store(at + LORA + i, r1, mask=i_ok)
        tl.store(at + LORA + HALF + i, r2, mask=i_ok)


def mla_rope_cache_config(nope: int, rope: int, kv_lora: int) -> dict:
    """Constexpr tiles and launch options (static shapes only)."""
    block_lora = triton.next_power_of_2(kv_lora)
    return dict(BLOCK_NOPE=triton.next_power_of_2(max(nope, 1)), BLOCK_HALF=triton.next_power_of_2(rope // 2),
                BLOCK_LORA=block_lora, num_warps=4 if block_lora >= 512 else 1)


class MLARopeCache:
    """The MLA preparation for static shapes: a call checks nothing, allocates nothing and never
    syncs with the host (CUDA-graph capturable). See mla_rope_cache for the arguments."""

    def __init__(self, heads: int, nope: int, rope: int, kv_lora: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str):
        paged_checks.check_static(max_rows=1, heads=heads, kv_heads=1, head_dim=rope, block_size=block_size,
                                  max_blocks=1, dtype=dtype, max_head_dim=MAX_ROPE)
        for name, value, top in (("nope", nope, 1 << 12), ("kv_lora", kv_lora, MAX_LATENT)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= top:
                raise ValueError(f"{name}={value!r}: must be an integer in [1, {top}]")
        if rope % 2:
            raise ValueError(f"rope={rope}: must be even (RoPE turns pairs (i, i + r/2))")
        self.heads, self.nope, self.rope, self.kv_lora = heads, nope, rope, kv_lora
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        tuning.check_runnable(_mla_rope_cache_kernel, self.device)
        self.config = mla_rope_cache_config(nope, rope, kv_lora)

    def __call__(self, q, kv, positions, slots, block_table, cache, cos, sin, norm_w, q_out, *, eps: float):
        """Write q_out [n, heads, nope + rope] and the rows' [c | k_pe] into the cache; returns q_out."""
        n = q.shape[0]
        if n == 0:
            return q_out
        count_launch()
        _mla_rope_cache_kernel[(n, self.heads + 1)](
            q, kv, positions, slots, block_table, cache, cos, sin, norm_w, q_out,
            eps, q.stride(0), q.stride(1), kv.stride(0), block_table.stride(0), cache.stride(0), cache.stride(1),
            q_out.stride(0), q_out.stride(1),
            HEADS=self.heads, NOPE=self.nope, ROPE=self.rope, LORA=self.kv_lora, PAGE=self.block_size,
            **self.config)
        return q_out


def mla_rope_cache(q, kv, positions, slots, block_table, cache, cos, sin, norm_w, *, eps: float = 1e-6,
                   q_out=None):
    """Turn q's rotary part; norm the latent, turn the shared key, write both into the latent cache.

    q [n, heads, nope + rope] and kv [n, kv_lora + rope] fp16/bf16/fp32 (unit stride along the last
    dim); positions [n] int32 (< max_positions); slots [n] int32 (-1: padding row, nothing written);
    block_table [num_slots, max_blocks] int32; cache one layer [num_blocks, block_size, 1,
    kv_lora + rope] in q's dtype; cos, sin [max_positions, rope // 2] fp32; norm_w [kv_lora];
    eps > 0. The rotary width `rope` is cos's width x 2. Returns q_out [n, heads, nope + rope] in
    q's dtype. Checks every argument (values too: one host sync).
    """
    heads, nope, rope, kv_lora = _check_call(q, kv, positions, slots, block_table, cache, cos, sin, norm_w,
                                             eps, q_out)
    if q_out is None:
        q_out = torch.empty_like(q)
    prepared = MLARopeCache(heads, nope, rope, kv_lora, cache.shape[1], q.dtype, q.device)
    return prepared(q, kv, positions, slots, block_table, cache, cos, sin, norm_w, q_out, eps=eps)


def _check_call(q, kv, positions, slots, block_table, cache, cos, sin, norm_w, eps, q_out) -> tuple:
    """(heads, nope, rope, kv_lora), after checking every argument."""
    check = paged_checks.check_tensor
    check("q", q, dims=3, dtypes=paged_checks.FLOAT_DTYPES, device=None)
    dev, dtype = q.device, q.dtype
    check("kv", kv, dims=2, dtypes=(dtype,), device=dev)
    check("cos", cos, dims=2, dtypes=(torch.float32,), device=dev)
    n, heads, width = q.shape
    rope = 2 * cos.shape[1]
    nope, kv_lora = width - rope, kv.shape[1] - rope
    if nope < 1 or kv_lora < 1 or q.stride(2) != 1 or kv.stride(1) != 1 or kv.shape[0] != n:
        raise ValueError(f"q {tuple(q.shape)}, kv {tuple(kv.shape)}, rope {rope}: q must be [n, heads, nope + "
                         f"{rope}] and kv [n, kv_lora + {rope}] with unit stride along the last dim")
    num_blocks, block_size, _ = paged_checks.check_cache("cache", cache, kv_heads=1, head_dim=kv_lora + rope,
                                                         dtype=dtype, device=dev)
    if sin.shape != cos.shape or not (cos.is_contiguous() and sin.is_contiguous()) or sin.dtype != cos.dtype:
        raise ValueError(f"sin {tuple(sin.shape)}, cos {tuple(cos.shape)}: must be equal fp32 contiguous tables")
    check("norm_w", norm_w, dims=1, dtypes=paged_checks.FLOAT_DTYPES, device=dev)
    if norm_w.shape[0] != kv_lora or not norm_w.is_contiguous():
        raise ValueError(f"norm_w.shape={tuple(norm_w.shape)}: must be [{kv_lora}] (contiguous)")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps={eps!r}: must be a number > 0")
    if q_out is not None and (q_out.shape != q.shape or q_out.dtype != dtype or q_out.stride(2) != 1):
        raise ValueError(f"q_out: shape {tuple(q_out.shape)}, dtype {q_out.dtype}: must be like q")
    paged_checks.check_rows(n, dev, block_table, slots, positions=positions)
    pos = positions.cpu().long()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= cos.shape[0]):
        raise ValueError(f"positions: values span [{int(pos.min())}, {int(pos.max())}]; must lie "
                         f"in [0, max_positions={cos.shape[0]})")
    paged_checks.check_row_values(block_table, slots, num_blocks, block_size, {"positions + 1": positions + 1})
    return heads, nope, rope, kv_lora
