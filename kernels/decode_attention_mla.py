"""Paged MLA decode attention in the absorbed form, split-K: one query token per row, the latent
cache read in place.

Each cached row is [c | k_pe] (kv_lora + rope values: the normed KV latent and the rotated shared
key); every head reads the same rows (one "kv head"). Row i's head h has an absorbed query
[q_lat | q_pe] (q_nope folded through W_UK, width kv_lora, then the rotated q_pe). Launch 1: a
program serves one (row, block of heads, split of the row's keys) and accumulates, online in fp32,

    s = (q_lat . c + q_pe . k_pe) * scale,   o_lat = softmax(s) c      (width kv_lora)

writing its normalised partial and log-sum-exp; launch 2 (decode_attention's combine kernel) merges
a row's partials. The caller applies W_UV to o_lat. Always these two launches. Only positions
< seq_lens[i] and blocks < ceil(len / block_size) are read, no gather copy; a padding row (slot -1)
reads nothing and its output is zeros. Widths that are not powers of two are masked.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from pyengine.kernels import paged_checks, tuning
from pyengine.kernels.decode_attention import (LOG2E, _decode_attention_combine_kernel, _online_softmax,
                                               _split_bounds, _tile_rows, combine_config, device_sms,
                                               split_count)
from pyengine.kernels.launch_count import count_launch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_LATENT = 1024
MAX_ROPE = 128


@triton.jit
def _decode_mla_split_kernel(
    q_ptr,  # (n, heads, C + R): [q_lat | q_pe]
    cache_ptr,  # (num_blocks, block_size, 1, C + R): [c | k_pe]
    block_table_ptr,  # (num_slots, max_blocks) int32
    slots_ptr, seq_lens_ptr,  # (n,) int32 each
    part_o_ptr,  # (n, heads, num_splits, C) fp32 partial outputs
    part_lse_ptr,  # (n, heads, num_splits) fp32 log2-sum-exp2 of the scaled scores
    num_splits, heads, scale_log2,
    stride_qn, stride_qh, stride_cb, stride_cr, stride_bt, table_width,
    C: tl.constexpr, R: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):
    row = tl.program_id(0)
    head_block = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + row)
    length = tl.load(seq_lens_ptr + row)
    start, chunk = _split_bounds(length, 0, num_splits, BLOCK_N)
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, length)
    if (slot < 0) | (lo >= hi):  # padding row, or a split past the row's keys
        return
    h = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = h < heads
    c = tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    c_ok, r_ok = c < C, r < R
    q_row = q_ptr + row.to(tl.int64) * stride_qn + h[:, None] * stride_qh
    q_lat = tl.load(q_row + c[None, :], mask=h_ok[:, None] & c_ok[None, :], other=0.0)
    q_pe = tl.load(q_row + C + r[None, :], mask=h_ok[:, None] & r_ok[None, :], other=0.0)
    m = tl.full((BLOCK_H,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_H, BLOCK_C), dtype=tl.float32)
    table = block_table_ptr + slot.to(tl.int64) * stride_bt
    for t0 in range(lo, hi, BLOCK_N):
        valid, page, in_page = _tile_rows(table, t0, hi, table_width, PAGE, BLOCK_N)
        base = cache_ptr + page[:, None] * stride_cb + in_page[:, None] * stride_cr
        lat = tl.load(base + c[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)  # (N, C)
        k_pe = tl.load(base + C + r[None, :], mask=valid[:, None] & r_ok[None, :], other=0.0)  # (N, R)
        s = tl.dot(q_lat, tl.trans(lat), input_precision=DOT_PRECISION)
        s += tl.dot(q_pe, tl.trans(k_pe), input_precision=DOT_PRECISION)
        m_new, alpha, p, l = _online_softmax(s * scale_log2, valid, m, l)
        acc = acc * alpha[:, None] + tl.dot(p.to(lat.dtype), lat, input_precision=DOT_PRECISION)
        m = m_new
    part = (row * heads + h).to(tl.int64) * num_splits + split
    tl.store(part_o_ptr + part[:, None] * C + c[None, :], acc / l[:, None], mask=h_ok[:, None] & c_ok[None, :])
    tl.store(part_lse_ptr + part, m + tl.log2(l), mask=h_ok)


def decode_mla_config(latent: int, rope: int, heads: int, device: torch.device) -> dict:
    """Tiles of the split kernel: a block of up to 16 heads (tl.dot's minimum rows; extra masked),
    the whole latent and rope widths, BLOCK_N keys per step."""
    cfg = dict(BLOCK_H=16, BLOCK_C=max(16, triton.next_power_of_2(latent)),
               BLOCK_R=max(16, triton.next_power_of_2(rope)))
    if device.type == "cpu":  # interpreter: small tiles make short test rows cross several
        return dict(cfg, BLOCK_N=16, num_warps=1, num_stages=1)
    # a [16, 512] fp32 accumulator and a [32, 576] tile: 8 warps keep them in registers
    return dict(cfg, BLOCK_N=32 if latent > 256 else 64, num_warps=8, num_stages=2)


class DecodeMLA:
    """MLA decode prepared for static shapes (split counts and fp32 partials fixed here: a call
    allocates nothing, checks nothing, never syncs; CUDA-graph capturable)."""

    def __init__(self, max_rows: int, heads: int, latent: int, rope: int, block_size: int, max_blocks: int,
                 dtype: torch.dtype, device: torch.device | str):
        paged_checks.check_static(max_rows=max_rows, heads=heads, kv_heads=1, head_dim=latent + rope,
                                  block_size=block_size, max_blocks=max_blocks, dtype=dtype,
                                  max_head_dim=MAX_LATENT + MAX_ROPE)
        if rope > MAX_ROPE or rope < 1:
            raise ValueError(f"rope={rope}: must be in [1, {MAX_ROPE}]")
        self.max_rows, self.heads, self.latent, self.rope = max_rows, heads, latent, rope
        self.block_size, self.max_blocks, self.dtype = block_size, max_blocks, dtype
        self.device = torch.device(device)
        for kernel in (_decode_mla_split_kernel, _decode_attention_combine_kernel):
            tuning.check_runnable(kernel, self.device)
        self.config = decode_mla_config(latent, rope, heads, self.device)
        self.head_blocks = triton.cdiv(heads, self.config["BLOCK_H"])
        sms = device_sms(self.device)
        self.splits = [split_count(n, self.head_blocks, max_blocks * block_size, self.config["BLOCK_N"], sms)
                       for n in range(max_rows + 1)]
        most = max(n * s for n, s in enumerate(self.splits))
        f32 = dict(device=self.device, dtype=torch.float32)
        self._part_o = torch.empty(most * heads * latent, **f32)
        self._part_lse = torch.empty(most * heads, **f32)

    def __call__(self, q, cache, block_table, slots, seq_lens, out, *, scale: float):
        """Write out [n, heads, latent] (q.dtype) for q [n, heads, latent + rope]; returns out."""
        n = q.shape[0]
        if n == 0:
            return out
        splits = self.splits[n]
        part_o = self._part_o[: n * self.heads * splits * self.latent]
        part_lse = self._part_lse[: n * self.heads * splits]
        cfg = self.config
        count_launch()
        _decode_mla_split_kernel[(n, self.head_blocks, splits)](
            q, cache, block_table, slots, seq_lens, part_o, part_lse, splits, self.heads, scale * LOG2E,
            q.stride(0), q.stride(1), cache.stride(0), cache.stride(1), block_table.stride(0),
            block_table.shape[1],
            C=self.latent, R=self.rope, PAGE=self.block_size,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else None, **cfg)
        count_launch()
        _decode_attention_combine_kernel[(n, self.heads)](
            part_o, part_lse, slots, seq_lens, part_lse, out, splits, 0, self.heads, out.stride(0), out.stride(1),
            HEAD_DIM=self.latent, HAS_SINKS=False, BLOCK_N=cfg["BLOCK_N"], **combine_config(splits, self.latent))
        return out


def decode_mla(q, cache, block_table, slots, seq_lens, *, latent: int, scale: float, out=None):
    """Absorbed MLA decode over one layer's latent cache; returns out [n, heads, latent].

    q [n, heads, latent + rope] fp16/bf16/fp32 (unit stride last); cache [num_blocks, block_size, 1,
    latent + rope] in q's dtype, contiguous; block_table [num_slots, max_blocks] int32; slots [n]
    int32 (-1: padding row, output zeros); seq_lens [n] int32 (keys of row i, its new one included);
    scale > 0. Checks every argument (values too: one host sync), then prepares a DecodeMLA.
    """
    paged_checks.check_tensor("q", q, dims=3, dtypes=DTYPES, device=None)
    n, heads, width = q.shape
    if not isinstance(latent, int) or not 0 < latent < width:
        raise ValueError(f"latent={latent!r}: must be an int in [1, {width - 1}] (q's width is latent + rope)")
    if q.stride(2) != 1:
        raise ValueError(f"q.stride()={q.stride()}: must have unit stride along the width")
    num_blocks, block_size, _ = paged_checks.check_cache("cache", cache, kv_heads=1, head_dim=width,
                                                         dtype=q.dtype, device=q.device)
    paged_checks.check_rows(n, q.device, block_table, slots, seq_lens=seq_lens)
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r}: must be a finite number > 0")
    if out is None:
        out = torch.empty(n, heads, latent, dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (n, heads, latent) or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError(f"out: shape {tuple(out.shape)}, dtype {out.dtype}: must be [{n}, {heads}, {latent}] "
                         f"{q.dtype} with unit stride last")
    paged_checks.check_row_values(block_table, slots, num_blocks, block_size, {"seq_lens": seq_lens})
    attn = DecodeMLA(max(n, 1), heads, latent, width - latent, block_size, block_table.shape[1], q.dtype, q.device)
    return attn(q, cache, block_table, slots, seq_lens, out, scale=scale)
