"""q/k RMSNorm + RoPE + the K/V write into the paged cache, in one launch, from the fused QKV GEMM.

qkv [n, (heads + 2 * kv_heads) * d] holds q, then k, then v of each row (bias added). One
program serves one (row, head): a q head writes q_out[row, head]; a kv head writes its
rotated k and its v at the row's position in the row's slot (block
block_table[slot, (pos // block_size) % max_blocks], row pos % block_size: a sliding window's
ring table wraps). A padding row (slot -1) writes
nothing to the cache and zeros to q_out.

Numerics, as the engine's torch path (pyengine.model.math.rmsnorm, then RoPE) and the
transformers Qwen3-MoE / OLMoE attention modules order them: the norm in fp32,
x * rsqrt(mean(x^2) + eps) * w, rounded once to the model dtype; RoPE (rotate-half: pair
(i, i + d/2) turns by angle position * inv_freq[i]) on that rounded value, from fp32 cos/sin
tables, in fp32, rounded once. qk_norm: none; per_head (over each head's d, weights [d]);
full (over the whole q and the whole k projection, as OLMoE does before the head split,
weights [heads * d] and [kv_heads * d]).
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl

from pyengine.kernels import paged_checks, tuning
from pyengine.kernels.choices import Choice
from pyengine.kernels.launch_count import count_launch

MAX_BLOCK_FULL = 4096  # elements per step of the full-projection sum of squares
MAX_HEAD_DIM = 256


class QKNorm(Choice, field="qk_norm"):
    """Where q and k are RMS-normed before RoPE (the spec's qk_norm names)."""
    NONE = 0
    PER_HEAD = 1
    FULL = 2


@triton.jit
def _qk_rope_cache_kernel(
    qkv_ptr,  # (n, (heads + 2 * kv_heads) * d)
    positions_ptr, slots_ptr,  # (n,) int32 each
    block_table_ptr,  # (num_slots, max_blocks) int32
    k_cache_ptr, v_cache_ptr,  # (num_blocks, block_size, kv_heads, d) each
    cos_ptr, sin_ptr,  # (max_positions, d // 2) fp32 each
    q_norm_ptr, k_norm_ptr,  # (d,) per head or (heads * d,) / (kv_heads * d,) full; fp32 read
    q_out_ptr,  # (n, heads, d)
    eps, stride_qkv, stride_bt, table_width, stride_cb, stride_cr, stride_ch, stride_qn, stride_qh,
    HEADS: tl.constexpr, KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    NORM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_FULL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    is_q = head < HEADS
    slot = tl.load(slots_ptr + row)
    HALF: tl.constexpr = HEAD_DIM // 2
    i = tl.arange(0, BLOCK_HALF)
    i_ok = i < HALF
    if slot < 0:  # padding row: no cache write; q_out zeros
        if is_q:
            out = q_out_ptr + row * stride_qn + head * stride_qh
            tl.store(out + i, tl.zeros((BLOCK_HALF,), tl.float32).to(q_out_ptr.dtype.element_ty), mask=i_ok)
            tl.store(out + HALF + i, tl.zeros((BLOCK_HALF,), tl.float32).to(q_out_ptr.dtype.element_ty), mask=i_ok)
        return
    # q head h: columns [h * d, (h + 1) * d); kv head j: k at [(HEADS + j) * d, ...), v KV_HEADS
    # heads further. `part` starts the row's q or k projection, `local` is the head within it.
    local = tl.where(is_q, head, head - HEADS)
    part = tl.where(is_q, 0, HEADS * HEAD_DIM)
    width = tl.where(is_q, HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM)
    x_ptr = qkv_ptr + row * stride_qkv + part + local * HEAD_DIM
    x1 = tl.load(x_ptr + i, mask=i_ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + i, mask=i_ok, other=0.0).to(tl.float32)
    if NORM != 0:
        if NORM == 1:  # over this head's d
            ms = (tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / HEAD_DIM
            w_off = i
        else:  # over the whole q (or k) projection of the row
            sq = tl.zeros((BLOCK_FULL,), tl.float32)
            for c0 in range(0, width, BLOCK_FULL):
                c = c0 + tl.arange(0, BLOCK_FULL)
                v = tl.load(qkv_ptr + row * stride_qkv + part + c, mask=c < width, other=0.0).to(tl.float32)
                sq += v * v
            ms = tl.sum(sq, 0) / width
            w_off = local * HEAD_DIM + i
        rstd = 1.0 / tl.sqrt(ms + eps)
        if is_q:
            w1 = tl.load(q_norm_ptr + w_off, mask=i_ok, other=0.0).to(tl.float32)
            w2 = tl.load(q_norm_ptr + w_off + HALF, mask=i_ok, other=0.0).to(tl.float32)
        else:
            w1 = tl.load(k_norm_ptr + w_off, mask=i_ok, other=0.0).to(tl.float32)
            w2 = tl.load(k_norm_ptr + w_off + HALF, mask=i_ok, other=0.0).to(tl.float32)
        # rounded once to the model dtype, as the norm's output is before RoPE
        x1 = (x1 * rstd * w1).to(q_out_ptr.dtype.element_ty).to(tl.float32)
        x2 = (x2 * rstd * w2).to(q_out_ptr.dtype.element_ty).to(tl.float32)
    pos = tl.load(positions_ptr + row)
    cos = tl.load(cos_ptr + pos.to(tl.int64) * HALF + i, mask=i_ok, other=0.0)
    sin = tl.load(sin_ptr + pos.to(tl.int64) * HALF + i, mask=i_ok, other=0.0)
    r1 = (x1 * cos - x2 * sin).to(q_out_ptr.dtype.element_ty)
    r2 = (x2 * cos + x1 * sin).to(q_out_ptr.dtype.element_ty)
    if is_q:
        out = q_out_ptr + row * stride_qn + head * stride_qh
        tl.store(out + i, r1, mask=i_ok)
        tl.store(out + HALF + i, r2, mask=i_ok)
    else:
        entry = (pos // PAGE) % table_width  # a ring table (a sliding window's) wraps
        page = tl.load(block_table_ptr + slot.to(tl.int64) * stride_bt + entry).to(tl.int64)
        at = page * stride_cb + (pos % PAGE).to(tl.int64) * stride_cr + local * stride_ch
        tl.store(k_cache_ptr + at + i, r1, mask=i_ok)
        tl.store(k_cache_ptr + at + HALF + i, r2, mask=i_ok)
        v_ptr = x_ptr + KV_HEADS * HEAD_DIM  # v follows k in the row
        tl.store(v_cache_ptr + at + i, tl.load(v_ptr + i, mask=i_ok), mask=i_ok)
        tl.store(v_cache_ptr + at + HALF + i, tl.load(v_ptr + HALF + i, mask=i_ok), mask=i_ok)


def qk_rope_cache_config(heads: int, kv_heads: int, head_dim: int, qk_norm: QKNorm) -> dict:
    """Constexpr tiles and launch options (static shapes only)."""
    block_full = 16
    if qk_norm == QKNorm.FULL:
        block_full = min(MAX_BLOCK_FULL, triton.next_power_of_2(heads * head_dim))
    block_half = triton.next_power_of_2(head_dim // 2)
    return dict(BLOCK_HALF=block_half, BLOCK_FULL=block_full,
                num_warps=4 if block_full >= 2048 else (2 if block_full >= 512 else 1))


class QKRopeCache:
    """The q/k norm + RoPE + cache write prepared for static shapes: a call checks nothing,
    allocates nothing and never syncs with the host (CUDA-graph capturable). See
    qk_rope_cache for the arguments."""

    def __init__(self, max_rows: int, heads: int, kv_heads: int, head_dim: int, block_size: int,
                 dtype: torch.dtype, device: torch.device | str, *, qk_norm="none"):
        paged_checks.check_static(max_rows=max_rows, heads=heads, kv_heads=kv_heads,
                                  head_dim=head_dim, block_size=block_size, max_blocks=1,
                                  dtype=dtype, max_head_dim=MAX_HEAD_DIM)
        if head_dim % 2:
            raise ValueError(f"head_dim={head_dim}: must be even (RoPE turns pairs (i, i + d/2))")
        self.max_rows, self.heads, self.kv_heads, self.head_dim = max_rows, heads, kv_heads, head_dim
        self.block_size, self.dtype, self.device = block_size, dtype, torch.device(device)
        self.qk_norm = QKNorm.parse(qk_norm)
        tuning.check_runnable(_qk_rope_cache_kernel, self.device)
        self.config = qk_rope_cache_config(heads, kv_heads, head_dim, self.qk_norm)

    def __call__(self, qkv, positions, slots, block_table, k_cache, v_cache, cos, sin, q_out, *,
                 q_norm_w=None, k_norm_w=None, eps: float = 1e-6):
        """Write q_out [n, heads, d] and the rows' k, v into the caches; returns q_out."""
        n = qkv.shape[0]
        if n == 0:
            return q_out
        norm_ws = (q_norm_w, k_norm_w) if self.qk_norm != QKNorm.NONE else (cos, cos)
        count_launch()
        _qk_rope_cache_kernel[(n, self.heads + self.kv_heads)](
            qkv, positions, slots, block_table, k_cache, v_cache, cos, sin, *norm_ws, q_out,
            eps, qkv.stride(0), block_table.stride(0), block_table.shape[1], *k_cache.stride()[:3],
            q_out.stride(0), q_out.stride(1),
            HEADS=self.heads, KV_HEADS=self.kv_heads, HEAD_DIM=self.head_dim,
            PAGE=self.block_size, NORM=int(self.qk_norm), **self.config)
        return q_out


def qk_rope_cache(qkv, positions, slots, block_table, k_cache, v_cache, cos, sin, *,
                  qk_norm="none", q_norm_w=None, k_norm_w=None, eps: float = 1e-6, q_out=None,
                  window: int = 0):
    """Norm and rotate q and k of the fused QKV output, write k and v into the paged cache.

    qkv [n, (heads + 2 * kv_heads) * d] fp16/bf16/fp32 (unit stride along the row);
    positions [n] int32 (< max_positions); slots [n] int32 (-1: padding row, nothing written);
    block_table [num_slots, max_blocks] int32; k_cache, v_cache one layer
    [num_blocks, block_size, kv_heads, d] in qkv's dtype (heads follows from qkv's width);
    cos, sin [max_positions, d // 2] fp32; qk_norm none / per_head (q_norm_w, k_norm_w [d]) /
    full (q_norm_w [heads * d], k_norm_w [kv_heads * d]); eps > 0. Returns q_out
    [n, heads, d] in qkv's dtype. window > 0: block_table is that window's ring (positions
    past max_blocks * block_size wrap). Checks every argument (values too: one host sync).
    """
    norm = QKNorm.parse(qk_norm)
    heads = _check_call(qkv, positions, slots, block_table, k_cache, v_cache, cos, sin, norm,
                        q_norm_w, k_norm_w, eps, q_out, window)
    n, (_, block_size, kv_heads, d) = qkv.shape[0], k_cache.shape
    if q_out is None:
        q_out = torch.empty(n, heads, d, device=qkv.device, dtype=qkv.dtype)
    prepared = QKRopeCache(max(n, 1), heads, kv_heads, d, block_size, qkv.dtype, qkv.device,
                           qk_norm=norm)
    return prepared(qkv, positions, slots, block_table, k_cache, v_cache, cos, sin, q_out,
                    q_norm_w=q_norm_w, k_norm_w=k_norm_w, eps=eps)


def _check_call(qkv, positions, slots, block_table, k_cache, v_cache, cos, sin, norm: QKNorm,
                q_norm_w, k_norm_w, eps, q_out, window: int = 0) -> int:
    """heads, after checking every argument."""
    paged_checks.check_tensor("qkv", qkv, dims=2, dtypes=paged_checks.FLOAT_DTYPES, device=None)
    dev, dtype = qkv.device, qkv.dtype
    num_blocks, block_size, kv_heads = paged_checks.check_cache(
        "k_cache", k_cache, kv_heads=None, head_dim=None, dtype=dtype, device=dev)
    d = k_cache.shape[3]
    paged_checks.check_cache("v_cache", v_cache, kv_heads=kv_heads, head_dim=d, dtype=dtype, device=dev)
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache.shape={tuple(v_cache.shape)}: must equal k_cache.shape={tuple(k_cache.shape)}")
    n, width = qkv.shape
    if width % d or width // d <= 2 * kv_heads or qkv.stride(1) != 1:
        raise ValueError(f"qkv: shape {tuple(qkv.shape)}, strides {qkv.stride()}: must be "
                         f"[n, (heads + 2 * {kv_heads}) * {d}] with unit stride along the row")
    heads = width // d - 2 * kv_heads
    paged_checks.check_rows(n, dev, block_table, slots, positions=positions)
    paged_checks.check_static(heads=heads, kv_heads=kv_heads, head_dim=d, block_size=block_size,
                              max_blocks=block_table.shape[1], dtype=dtype, max_head_dim=MAX_HEAD_DIM)
    if d % 2:
        raise ValueError(f"k_cache.shape[3]={d}: head_dim must be even (RoPE turns pairs (i, i + d/2))")
    for name, t in (("cos", cos), ("sin", sin)):
        paged_checks.check_tensor(name, t, dims=2, dtypes=(torch.float32,), device=dev)
        if t.shape[1] != d // 2 or not t.is_contiguous():
            raise ValueError(f"{name}.shape={tuple(t.shape)}: must be [max_positions, {d // 2}], contiguous")
    if sin.shape != cos.shape:
        raise ValueError(f"sin.shape={tuple(sin.shape)}: must equal cos.shape={tuple(cos.shape)}")
    want = {QKNorm.PER_HEAD: (d, d), QKNorm.FULL: (heads * d, kv_heads * d)}.get(norm)
    for name, w, size in (("q_norm_w", q_norm_w, want and want[0]), ("k_norm_w", k_norm_w, want and want[1])):
        if want is None:
            if w is not None:
                raise ValueError(f"{name}: must be None for qk_norm='none'")
            continue
        paged_checks.check_tensor(name, w, dims=1, dtypes=paged_checks.FLOAT_DTYPES, device=dev)
        if w.shape[0] != size or not w.is_contiguous():
            raise ValueError(f"{name}.shape={tuple(w.shape)}: must be [{size}] (contiguous) for "
                             f"qk_norm={norm.name.lower()!r}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps={eps!r}: must be a number > 0")
    if q_out is not None and (tuple(q_out.shape) != (n, heads, d) or q_out.dtype != dtype
                              or q_out.device != dev or q_out.stride(2) != 1):
        raise ValueError(f"q_out: shape {tuple(q_out.shape)}, dtype {q_out.dtype}: must be "
                         f"[{n}, {heads}, {d}] {dtype} on {dev}, unit stride along d")
    pos = positions.cpu().long()
    if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= cos.shape[0]):
        raise ValueError(f"positions: values span [{int(pos.min())}, {int(pos.max())}]; must lie "
                         f"in [0, max_positions={cos.shape[0]})")
    paged_checks.check_row_values(block_table, slots, num_blocks, block_size,
                                  {"positions + 1": positions + 1},  # keys once this one is written
                                  window=window)
    return heads
