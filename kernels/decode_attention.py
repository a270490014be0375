"""Paged decode attention, split-K (flash-decoding): one query token per row, keys read in place.

Row i (slot slots[i], seq_lens[i] keys, its own new key included) attends to its keys through
the block table: position p lives in block block_table[slot, p // block_size], row
p % block_size (entry (p // block_size) % max_blocks: a sliding window's table of
paged_checks.ring_blocks(window) entries is a ring over any number of positions). Launch 1 splits each row's keys into `num_splits` chunks; a program serves one
(row, kv head, chunk) and all heads / kv_heads query heads of that kv head (GQA: query head j
reads kv head j // group), accumulates softmax(q k^T * scale) v online in fp32 and writes its
normalised partial output and log-sum-exp. Launch 2 combines a row's partials by
log-sum-exp (adding a per-head sink logit to the denominator when given, as gpt-oss does).
Always these two launches: the count never depends on the data.

Only positions < seq_lens[i] are read, and only blocks < ceil(len / block_size); no gather
copy. A window > 0 keeps the last `window` keys. A padding row (slot -1) reads nothing and its
output is zeros. Head dims that are not powers of two are padded to one with masks.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from pyengine.kernels import paged_checks, tuning
from pyengine.kernels.launch_count import count_launch

LOG2E = 1.4426950408889634
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ENV_PIN = "PYENGINE_DECODE_ATTENTION_CONFIG"  # e.g. "BLOCK_N=64,num_warps=4,num_stages=2"
FILL_FACTOR = 2  # (row, kv head, split) programs per SM the split count aims for
CPU_SMS = 4  # the interpreter has no SMs: a small fixed count keeps split counts testable
MAX_SPLITS = 64
MAX_HEAD_DIM = 256


@triton.jit
def _split_bounds(length, window, num_splits, BLOCK_N: tl.constexpr):
    """(first key, keys per split) of a row: the split size is a whole number of tiles."""
    start = tl.where(window > 0, tl.maximum(length - window, 0), 0)
    chunk = tl.cdiv(tl.cdiv(length - start, num_splits), BLOCK_N) * BLOCK_N
    return start, chunk


@triton.jit
def _tile_rows(table, t0, hi, table_width, PAGE: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys t0 .. t0 + BLOCK_N of a row whose block-table row is `table` (`table_width` entries,
    a ring: key p's block is entry (p // PAGE) % table_width, which is p // PAGE itself when the
    table covers every key): (valid: below hi, their blocks, their rows in the block)."""
    pos = t0 + tl.arange(0, BLOCK_N)
    valid = pos < hi
    page = tl.load(table + (pos // PAGE) % table_width, mask=valid, other=0).to(tl.int64)
    return valid, page, (pos % PAGE).to(tl.int64)


@triton.jit
def _online_softmax(s, valid, m, l):
    """One tile of the online softmax over log2-scaled scores s [rows, keys] (invalid keys
    masked): (new running max, the factor the old sums are rescaled by, p, new running sum)."""
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, 1))  # finite: every tile holds a valid key
    alpha = tl.exp2(m - m_new)
    p = tl.exp2(s - m_new[:, None])
    return m_new, alpha, p, l * alpha + tl.sum(p, 1)


@triton.jit
def _decode_attention_split_kernel(
    q_ptr,  # (n, heads, d)
    k_cache_ptr, v_cache_ptr,  # (num_blocks, block_size, kv_heads, d) each
    block_table_ptr,  # (num_slots, max_blocks) int32
    slots_ptr, seq_lens_ptr,  # (n,) int32 each
    part_o_ptr,  # (n, heads, num_splits, d) fp32 partial outputs
    part_lse_ptr,  # (n, heads, num_splits) fp32 log2-sum-exp2 of the scaled scores
    num_splits, window, scale_log2,
    stride_qn, stride_qh, stride_kb, stride_kr, stride_kh, stride_vb, stride_vr, stride_vh,
    stride_bt, table_width,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    slot = tl.load(slots_ptr + row)
    length = tl.load(seq_lens_ptr + row)
    start, chunk = _split_bounds(length, window, num_splits, BLOCK_N)
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, length)
    if (slot < 0) | (lo >= hi):  # padding row, or a split past the row's keys
        return
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    heads = kv_head * GROUP + g
    q = tl.load(q_ptr + row.to(tl.int64) * stride_qn + heads[:, None] * stride_qh + d[None, :],
                mask=(g < GROUP)[:, None] & d_ok[None, :], other=0.0)
    m = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    table = block_table_ptr + slot.to(tl.int64) * stride_bt
    for t0 in range(lo, hi, BLOCK_N):
        valid, page, in_page = _tile_rows(table, t0, hi, table_width, PAGE, BLOCK_N)
        kv_mask = valid[:, None] & d_ok[None, :]
        k = tl.load(k_cache_ptr + page[:, None] * stride_kb + in_page[:, None] * stride_kr
                    + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        m_new, alpha, p, l = _online_softmax(s, valid, m, l)
        v = tl.load(v_cache_ptr + page[:, None] * stride_vb + in_page[:, None] * stride_vr
                    + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new
    part = (row * GROUP * tl.num_programs(1) + heads).to(tl.int64) * num_splits + split
    g_ok = g < GROUP
    tl.store(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :], acc / l[:, None],
             mask=g_ok[:, None] & d_ok[None, :])
    tl.store(part_lse_ptr + part, m + tl.log2(l), mask=g_ok)


@triton.jit
def _decode_attention_combine_kernel(
    part_o_ptr,  # (n, heads, num_splits, d) fp32
    part_lse_ptr,  # (n, heads, num_splits) fp32
    slots_ptr, seq_lens_ptr,  # (n,) int32 each
    sinks_ptr,  # (heads,) fp32; read only when HAS_SINKS
    out_ptr,  # (n, heads, d)
    num_splits, window, heads,
    stride_on, stride_oh,
    HEAD_DIM: tl.constexpr, HAS_SINKS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots_ptr + row)
    length = tl.load(seq_lens_ptr + row)
    start, chunk = _split_bounds(length, window, num_splits, BLOCK_N)
    active = tl.where((slot >= 0) & (chunk > 0), tl.cdiv(length - start, tl.maximum(chunk, 1)), 0)
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    live = s < active
    part = (row * heads + head).to(tl.int64) * num_splits + s
    lse = tl.load(part_lse_ptr + part, mask=live, other=float("-inf"))
    top = tl.max(lse, 0)
    if HAS_SINKS:  # the sink logit joins the denominator only
        sink = tl.load(sinks_ptr + head).to(tl.float32) * 1.4426950408889634
        top = tl.maximum(top, sink)
    top = tl.where(top == float("-inf"), 0.0, top)  # no key and no sink: all weights 0
    w = tl.exp2(lse - top)
    denom = tl.sum(w, 0)
    if HAS_SINKS:
        denom += tl.exp2(sink - top)
    o = tl.load(part_o_ptr + part[:, None] * HEAD_DIM + d[None, :],
                mask=live[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    res = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + row.to(tl.int64) * stride_on + head * stride_oh + d,
             res.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def decode_attention_config(head_dim: int, group: int, device: torch.device,
                            dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tiles and launch options of the split kernel (static shapes only). ENV_PIN overrides
    BLOCK_N / num_warps / num_stages, e.g. PYENGINE_DECODE_ATTENTION_CONFIG="BLOCK_N=32"."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_g = max(16, triton.next_power_of_2(group))  # tl.dot needs 16 rows; extra rows masked
    if device.type == "cpu":  # interpreter: small tiles make short test rows cross several
        cfg = dict(BLOCK_N=16, num_warps=1, num_stages=1)
    else:  # K and V tiles of 64 keys (16 KB each at d=128 in bf16), double-buffered; fp32
        # dots run on FMA with operands in registers: 8 warps keep them from spilling
        cfg = dict(BLOCK_N=64 if block_d <= 128 else 32, num_stages=2,
                   num_warps=8 if dtype == torch.float32 else 4)
    cfg.update(_pinned())
    return dict(BLOCK_G=block_g, BLOCK_D=block_d, **cfg)


def combine_config(splits: int, head_dim: int) -> dict:
    """The combine launch's tile: all of a (row, head)'s partials at once, about 32 fp32
    values per thread (one warp for 64 splits x 128 dims spilled on sm_90)."""
    block_s = triton.next_power_of_2(splits)
    block_d = max(16, triton.next_power_of_2(head_dim))
    return dict(BLOCK_S=block_s, BLOCK_D=block_d, num_warps=max(1, min(8, block_s * block_d // 1024)))


def _pinned() -> dict:
    text = os.environ.get(ENV_PIN, "")
    fields = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, _, value = item.partition("=")
        if key.strip() not in ("BLOCK_N", "num_warps", "num_stages") or not value.strip().isdigit():
            raise ValueError(f"{ENV_PIN}={text!r}: items must be BLOCK_N=, num_warps= or "
                             f"num_stages=<int>")
        fields[key.strip()] = int(value)
    if "BLOCK_N" in fields and (fields["BLOCK_N"] < 16 or fields["BLOCK_N"] & (fields["BLOCK_N"] - 1)):
        raise ValueError(f"{ENV_PIN}: BLOCK_N={fields['BLOCK_N']}: must be a power of two >= 16")
    return fields


def split_count(rows: int, kv_heads: int, max_keys: int, block_n: int, sms: int) -> int:
    """Splits per row so that rows x kv_heads x splits programs reach FILL_FACTOR per SM, at
    most one per tile of the longest row and at most MAX_SPLITS."""
    want = triton.cdiv(FILL_FACTOR * sms, max(rows, 1) * kv_heads)
    return max(1, min(want, triton.cdiv(max_keys, block_n), MAX_SPLITS))


def device_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return CPU_SMS


class DecodeAttention:
    """Decode attention prepared for static shapes: split counts per row count and the fp32
    partial buffers are fixed here, so a call allocates nothing, checks nothing and never
    syncs with the host (CUDA-graph capturable). See decode_attention for the arguments."""

    def __init__(self, max_rows: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                 max_blocks: int, dtype: torch.dtype, device: torch.device | str):
        paged_checks.check_static(max_rows=max_rows, heads=heads, kv_heads=kv_heads,
                                  head_dim=head_dim, block_size=block_size, max_blocks=max_blocks,
                                  dtype=dtype, max_head_dim=MAX_HEAD_DIM)
        self.max_rows, self.heads, self.kv_heads, self.head_dim = max_rows, heads, kv_heads, head_dim
        self.block_size, self.max_blocks, self.dtype = block_size, max_blocks, dtype
        self.device = torch.device(device)
        for kernel in (_decode_attention_split_kernel, _decode_attention_combine_kernel):
            tuning.check_runnable(kernel, self.device)
        self.config = decode_attention_config(head_dim, heads // kv_heads, self.device, dtype)
        sms = device_sms(self.device)
        self.splits = [split_count(n, kv_heads, max_blocks * block_size, self.config["BLOCK_N"], sms)
                       for n in range(max_rows + 1)]
        most = max(n * s for n, s in enumerate(self.splits))
        f32 = dict(device=self.device, dtype=torch.float32)
        self._part_o = torch.empty(most * heads * head_dim, **f32)
        self._part_lse = torch.empty(most * heads, **f32)

    def __call__(self, q, k_cache, v_cache, block_table, slots, seq_lens, out, *, sinks=None,
                 window: int = 0, scale: float | None = None):
        """Write out [n, heads, d] (q.dtype) for q [n, heads, d], n <= max_rows; returns out."""
        n = q.shape[0]
        if n == 0:
            return out
        splits = self.splits[n]
        part_o = self._part_o[: n * self.heads * splits * self.head_dim]
        part_lse = self._part_lse[: n * self.heads * splits]
        scale = 1.0 / math.sqrt(self.head_dim) if scale is None else scale
        cfg = self.config
        dot = "ieee" if q.dtype == torch.float32 else None  # no TF32 for fp32
        count_launch()
        _decode_attention_split_kernel[(n, self.kv_heads, splits)](
            q, k_cache, v_cache, block_table, slots, seq_lens, part_o, part_lse,
            splits, window, scale * LOG2E,
            q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
            block_table.stride(0), block_table.shape[1],
            GROUP=self.heads // self.kv_heads, HEAD_DIM=self.head_dim, PAGE=self.block_size,
            DOT_PRECISION=dot, **cfg)
        count_launch()
        _decode_attention_combine_kernel[(n, self.heads)](
            part_o, part_lse, slots, seq_lens, sinks if sinks is not None else part_lse, out,
            splits, window, self.heads, out.stride(0), out.stride(1),
            HEAD_DIM=self.head_dim, HAS_SINKS=sinks is not None, BLOCK_N=cfg["BLOCK_N"],
            **combine_config(splits, self.head_dim))
        return out


def decode_attention(q, k_cache, v_cache, block_table, slots, seq_lens, *, sinks=None,
                     window: int = 0, scale: float | None = None, out=None):
    """Attention of one query token per row over its paged keys; returns out [n, heads, d].

    q [n, heads, d] fp16/bf16/fp32; k_cache, v_cache [num_blocks, block_size, kv_heads, d] in
    q's dtype (one layer, contiguous); block_table [num_slots, max_blocks] int32; slots [n]
    int32 (-1: padding row, output zeros); seq_lens [n] int32 (keys of row i, its own new key
    included, at most max_blocks * block_size unless the table is a window's ring); sinks [heads] fp32 or None; window >= 0
    (0: all keys); scale > 0 (default 1/sqrt(d)). Checks every argument (values too: one host
    sync), then prepares a DecodeAttention for these shapes and calls it.
    """
    n, heads, d, kv_heads, block_size, max_blocks = _check_call(
        q, k_cache, v_cache, block_table, slots, seq_lens, sinks, window, scale, out)
    if out is None:
        out = torch.empty_like(q)
    attn = DecodeAttention(max(n, 1), heads, kv_heads, d, block_size, max_blocks, q.dtype, q.device)
    return attn(q, k_cache, v_cache, block_table, slots, seq_lens, out, sinks=sinks,
                window=window, scale=scale)


def _check_call(q, k_cache, v_cache, block_table, slots, seq_lens, sinks, window, scale, out):
    """(n, heads, d, kv_heads, block_size, max_blocks) after checking every argument."""
    paged_checks.check_tensor("q", q, dims=3, dtypes=DTYPES, device=None)
    n, heads, d = q.shape
    if q.stride(2) != 1:
        raise ValueError(f"q.stride()={q.stride()}: must have unit stride along d")
    num_blocks, block_size, kv_heads = paged_checks.check_cache(
        "k_cache", k_cache, kv_heads=None, head_dim=d, dtype=q.dtype, device=q.device)
    paged_checks.check_cache("v_cache", v_cache, kv_heads=kv_heads, head_dim=d, dtype=q.dtype,
                             device=q.device)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache.shape={tuple(v_cache.shape)}: must equal k_cache.shape="
                         f"{tuple(k_cache.shape)}")
    paged_checks.check_rows(n, q.device, block_table, slots, seq_lens=seq_lens)
    paged_checks.check_static(heads=heads, kv_heads=kv_heads, head_dim=d, block_size=block_size,
                              max_blocks=block_table.shape[1], dtype=q.dtype,
                              max_head_dim=MAX_HEAD_DIM)
    if sinks is not None:
        paged_checks.check_tensor("sinks", sinks, dims=1, dtypes=(torch.float32,), device=q.device)
        if sinks.shape[0] != heads:
            raise ValueError(f"sinks.shape={tuple(sinks.shape)}: must be [heads={heads}]")
    if not isinstance(window, int) or window < 0:
        raise ValueError(f"window={window!r}: must be an int >= 0 (0: every key)")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale={scale!r}: must be a finite number > 0")
    if out is not None:
        if tuple(out.shape) != (n, heads, d) or out.dtype != q.dtype or out.device != q.device:
            raise ValueError(f"out: shape {tuple(out.shape)}, dtype {out.dtype}: must be q's "
                             f"[{n}, {heads}, {d}] {q.dtype} on {q.device}")
        if out.stride(2) != 1:
            raise ValueError(f"out.stride()={out.stride()}: must have unit stride along d")
    paged_checks.check_row_values(block_table, slots, num_blocks, block_size, {"seq_lens": seq_lens},
                                  window=window)
    return n, heads, d, kv_heads, block_size, block_table.shape[1]
