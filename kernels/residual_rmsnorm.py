"""Stage 2's first kernel: h = x + sum(partials); normed = rmsnorm(h) * weight, in one pass.

The TP shards' partial outputs arrive unreduced ("partials straight to the consumer"), so
the all-reduce, the residual add and the norm read each input once and write once. Sums
and the norm run in fp32 on the unrounded h; h is stored (in x.dtype) only if asked for.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from pyengine.kernels import tuning
from pyengine.kernels.launch_count import count_launch

MAX_PARTIALS = 4
MAX_BLOCK_H = 8192  # one register-resident row up to this; longer rows loop over chunks
ENV_PIN = "PYENGINE_RMSNORM_CONFIG"  # e.g. "num_warps=8"


@triton.jit
def _residual_rmsnorm_kernel(
    x_ptr,  # (T, H)
    p0_ptr, p1_ptr, p2_ptr, p3_ptr,  # (T, H) each; only the first NUM_PARTIALS are read
    w_ptr,  # (H,)
    h_ptr,  # (T, H) residual out; written only if STORE_H
    out_ptr,  # (T, H)
    H, eps,
    stride_x, stride_p0, stride_p1, stride_p2, stride_p3, stride_h, stride_o,  # row strides
    NUM_PARTIALS: tl.constexpr, STORE_H: tl.constexpr, SINGLE_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if SINGLE_PASS:  # the whole row stays in registers: read each input once
        h = _residual_chunk(x_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, row, 0, H, stride_x,
                            stride_p0, stride_p1, stride_p2, stride_p3, NUM_PARTIALS, BLOCK_H)
        rstd = 1.0 / tl.sqrt(tl.sum(h * h) / H + eps)
        _store_normed(h, rstd, w_ptr, h_ptr, out_ptr, row, 0, H, stride_h, stride_o,
                      STORE_H, BLOCK_H)
    else:
        sq = tl.zeros((BLOCK_H,), dtype=tl.float32)
        for c0 in range(0, H, BLOCK_H):
            h = _residual_chunk(x_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, row, c0, H, stride_x,
                                stride_p0, stride_p1, stride_p2, stride_p3, NUM_PARTIALS, BLOCK_H)
            sq += h * h
        rstd = 1.0 / tl.sqrt(tl.sum(sq) / H + eps)
        # h is recomputed from the inputs (one more read) rather than re-read rounded, so
        # long rows give the same numbers as short ones.
        for c0 in range(0, H, BLOCK_H):
            h = _residual_chunk(x_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, row, c0, H, stride_x,
                                stride_p0, stride_p1, stride_p2, stride_p3, NUM_PARTIALS, BLOCK_H)
            _store_normed(h, rstd, w_ptr, h_ptr, out_ptr, row, c0, H, stride_h, stride_o,
                          STORE_H, BLOCK_H)


@triton.jit
def _store_normed(h, rstd, w_ptr, h_ptr, out_ptr, row, c0, H, stride_h, stride_o,
                  STORE_H: tl.constexpr, BLOCK_H: tl.constexpr):
    offs = c0 + tl.arange(0, BLOCK_H)
    mask = offs < H
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + offs, (h * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)
    if STORE_H:
        tl.store(h_ptr + row * stride_h + offs, h.to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _residual_chunk(x_ptr, p0_ptr, p1_ptr, p2_ptr, p3_ptr, row, c0, H, stride_x, stride_p0,
                    stride_p1, stride_p2, stride_p3, NUM_PARTIALS: tl.constexpr,
                    BLOCK_H: tl.constexpr):
    offs = c0 + tl.arange(0, BLOCK_H)
    mask = offs < H
    # Fixed order x + p0 + p1 + ...: deterministic, and the same for any chunking.
    h = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_PARTIALS > 0:
        h += tl.load(p0_ptr + row * stride_p0 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_PARTIALS > 1:
        h += tl.load(p1_ptr + row * stride_p1 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_PARTIALS > 2:
        h += tl.load(p2_ptr + row * stride_p2 + offs, mask=mask, other=0.0).to(tl.float32)
    if NUM_PARTIALS > 3:
        h += tl.load(p3_ptr + row * stride_p3 + offs, mask=mask, other=0.0).to(tl.float32)
    return h


def residual_rmsnorm_configs(H: int) -> list[triton.Config]:
    """num_warps candidates for a row of H; PYENGINE_RMSNORM_CONFIG='num_warps=N' pins one."""
    pinned = os.environ.get(ENV_PIN)
    if pinned:
        key, _, value = pinned.partition("=")
        if key.strip() != "num_warps" or not value.strip().isdigit():
            raise ValueError(f"{ENV_PIN}={pinned!r}: must be 'num_warps=<int>'")
        return [triton.Config({}, num_warps=int(value))]
    block = min(triton.next_power_of_2(H), MAX_BLOCK_H)
    # About 8 to 16 elements per thread: enough loads in flight without spilling.
    return [triton.Config({}, num_warps=max(1, min(16, block // 256)))]


def _fused_residual_rmsnorm(x, partials, weight, out, h_out=None, eps=1e-5):
    """Write rmsnorm(x + sum(partials)) * weight to out, and h to h_out if given."""
    T, H = x.shape
    for name, t in [("out", out)] + ([("h_out", h_out)] if h_out is not None else []):
        if tuple(t.shape) != (T, H) or t.dtype != x.dtype or t.device != x.device or t.stride(1) != 1:
            raise ValueError(f"{name}: shape {tuple(t.shape)}, dtype {t.dtype}, device "
                             f"{t.device}, stride {t.stride()}: must be x's [T, H], dtype, "
                             f"device, with unit stride along H")
    tuning.check_runnable(_residual_rmsnorm_kernel, x.device)
    if T == 0:
        return out
    block_h = min(triton.next_power_of_2(H), MAX_BLOCK_H)
    ps = list(partials) + [x] * (MAX_PARTIALS - len(partials))
    (cfg,) = residual_rmsnorm_configs(H)
    grid = lambda META: (T,)
    count_launch()
    _residual_rmsnorm_kernel[grid](
        x, *ps, weight, h_out if h_out is not None else out, out, H, eps,
        x.stride(0), *(p.stride(0) for p in ps), (h_out if h_out is not None else out).stride(0),
        out.stride(0), NUM_PARTIALS=len(partials), STORE_H=h_out is not None,
        SINGLE_PASS=block_h >= H, BLOCK_H=block_h,
        num_warps=cfg.num_warps)
    return out


def fused_residual_rmsnorm(x, partials, weight, eps: float = 1e-5, out=None, *,
                           return_residual: bool = False):
    """normed = rmsnorm(x + sum(partials)) * weight  (returns (h, normed) if return_residual).

    x [T, H] fp16/bf16/fp32; partials: a sequence of 1..4 tensors [T, H] (any float dtype,
    summed in fp32 with x in a fixed order); weight [H] (any float dtype). Rows may be
    strided, but each row must be contiguous (stride 1 along H); other layouts are copied.
    out: optional [T, H] in x.dtype. Outputs are in x.dtype.
    """
    if not isinstance(partials, (list, tuple)):
        raise TypeError(f"partials: got {type(partials).__name__}; must be a list or tuple of tensors")
    if not 1 <= len(partials) <= MAX_PARTIALS:
        raise ValueError(f"partials: got {len(partials)} tensors; must be 1..{MAX_PARTIALS}")
    named = [("x", x), ("weight", weight)] + [(f"partials[{i}]", p) for i, p in enumerate(partials)]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: got {type(t).__name__}; must be a torch.Tensor")
        if not t.is_floating_point():
            raise TypeError(f"{name}.dtype={t.dtype}: must be a float dtype")
        if t.device != x.device:
            raise ValueError(f"{name}.device={t.device}: must equal x.device={x.device}")
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: shape {tuple(x.shape)}, dtype {x.dtype}: must be [T, H] fp16/bf16/fp32")
    T, H = x.shape
    if H == 0:
        raise ValueError(f"x.shape={tuple(x.shape)}: H must be >= 1")
    if tuple(weight.shape) != (H,):
        raise ValueError(f"weight.shape={tuple(weight.shape)}: must be [H={H}]")
    for i, p in enumerate(partials):
        if tuple(p.shape) != (T, H):
            raise ValueError(f"partials[{i}].shape={tuple(p.shape)}: must equal x.shape={(T, H)}")
    if not eps > 0:
        raise ValueError(f"eps={eps}: must be > 0")
    x, weight = _unit_inner(x), weight.contiguous()
    partials = [_unit_inner(p) for p in partials]
    if out is None:
        out = torch.empty_like(x)
    h_out = torch.empty_like(x) if return_residual else None
    _fused_residual_rmsnorm(x, partials, weight, out, h_out, eps)
    return (h_out, out) if return_residual else out


def fused_rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """rmsnorm(x) * weight in one launch (the same kernel with no partials): x [T, H] with unit
    stride along H, weight [H]; computed in fp32, rounded once to x.dtype. No validation beyond the
    output's (the engine's own tensors)."""
    out = torch.empty_like(x)
    return _fused_residual_rmsnorm(x, [], weight, out, None, eps)


def _unit_inner(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()
