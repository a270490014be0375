"""Column-parallel grouped GEMM with a fused SwiGLU (or GELU, or gpt-oss's clamped SwiGLU) epilogue.

a[r, :] = silu(u[tok] @ w_gate[e]) * (u[tok] @ w_up[e]) for each aligned row r, where
pair = sorted_ids[r], tok = pair // top_k and e is the expert of r's block. One program
computes a BLOCK_M x BLOCK_N tile of both gate and up (fp32 accumulators, one pass over H
reading u once), so the [rows, 2F] pre-activation never goes to memory. `a` keeps the
aligned (padded) row order: the row GEMM then reads it without a gather. Padding rows are
not written.

clamped_swiglu: g = min(gate, limit), a = (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g);
with biases (gpt-oss), b_gate[e] and b_up[e] ([E, F]) are added to the accumulators first.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from pyengine.kernels import tuning
from pyengine.kernels.launch_count import count_launch
from pyengine.kernels.tiles import grouped_tile
from pyengine.kernels.moe_align import MoeAlignment, max_padded_rows

ACTIVATIONS = ("swiglu", "gelu", "clamped_swiglu")


@triton.jit
def _moe_column_kernel(
    u_ptr,  # (T, H)
    w_gate_ptr,  # (E, H, F); unused for GELU
    w_up_ptr,  # (E, H, F)
    out_ptr,  # (max_rows, F) aligned rows
    sorted_ids_ptr,  # (max_rows,) int32 pair ids, sentinel = num_pairs
    expert_ids_ptr,  # (max_rows // ALIGN_M,) int32
    num_padded_ptr,  # (1,) int32
    num_pairs, H, F, max_rows, m_bucket,  # m_bucket: autotune key only
    stride_ut, stride_uh,
    stride_we, stride_wh, stride_wf,  # shared by w_gate and w_up (checked by the launcher)
    stride_om, stride_of,
    b_gate_ptr, b_up_ptr,  # (E, F) each; read only when HAS_BIAS
    stride_be, alpha, limit,
    TOP_K: tl.constexpr, ALIGN_M: tl.constexpr, SWIGLU: tl.constexpr,
    CLAMPED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(max_rows, F, BLOCK_M, BLOCK_N, GROUP_M)

    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    # Padding sits at the end of each expert's run: a tile that starts with it (possible
    # when BLOCK_M < ALIGN_M) is all padding.
    if tl.load(sorted_ids_ptr + pid_m * BLOCK_M) >= num_pairs:
        return
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    tok = tl.where(valid, pair // TOP_K, 0)
    expert = tl.load(expert_ids_ptr + (pid_m * BLOCK_M) // ALIGN_M).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    u_ptrs = u_ptr + tok[:, None] * stride_ut + offs_k[None, :] * stride_uh
    w_off = expert * stride_we + offs_k[:, None] * stride_wh + offs_n[None, :] * stride_wf
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(H, BLOCK_K)):
        k_ok = offs_k < H - k0 * BLOCK_K
        x = tl.load(u_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & (offs_n[None, :] < F)
        w_up = tl.load(w_up_ptr + w_off, mask=w_mask, other=0.0)
        acc_up = tl.dot(x, w_up, acc_up, input_precision=DOT_PRECISION)
        if SWIGLU:
            w_gate = tl.load(w_gate_ptr + w_off, mask=w_mask, other=0.0)
            acc_gate = tl.dot(x, w_gate, acc_gate, input_precision=DOT_PRECISION)
        u_ptrs += BLOCK_K * stride_uh
        w_off += BLOCK_K * stride_wh

    if HAS_BIAS:
        b_off = expert * stride_be + offs_n
        acc_up += tl.load(b_up_ptr + b_off, mask=offs_n < F, other=0.0).to(tl.float32)[None, :]
        if SWIGLU:
            acc_gate += tl.load(b_gate_ptr + b_off, mask=offs_n < F, other=0.0).to(tl.float32)[None, :]
    if CLAMPED:
        g = tl.minimum(acc_gate, limit)
        act = (tl.minimum(tl.maximum(acc_up, -limit), limit) + 1.0) * (g * tl.sigmoid(g * alpha))
    elif SWIGLU:
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
    else:  # exact (erf) GELU, as torch.nn.functional.gelu's default
        act = 0.5 * acc_up * (1.0 + tl.erf(acc_up * 0.7071067811865476))
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_of
    tl.store(out_ptrs, act.to(out_ptr.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < F))


def _prune(configs, named_args, **kwargs):
    # Candidates must tile the alignment block exactly and fit the device's shared memory.
    u = named_args["u_ptr"]
    return tuning.prune_configs("column", configs, kwargs["ALIGN_M"], u.dtype, tuning.launch_arch(u))


_autotuned = {}


def _autotuned_kernel(device: torch.device):
    if device.type not in _autotuned:
        _autotuned[device.type] = triton.autotune(
            configs=tuning.moe_configs("column", device), key=["H", "F", "m_bucket"],
            prune_configs_by={"early_config_prune": _prune})(_moe_column_kernel)
    return _autotuned[device.type]


def column_rows(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of `a` for an alignment with this block_m (the aligned upper bound)."""
    return max_padded_rows(num_pairs, num_experts, block_m)


def _moe_column_swiglu(u, w_gate, w_up, align: MoeAlignment, top_k: int, out, *,
                       activation: str = "swiglu", config: triton.Config | None = None,
                       clamp: Clamp | None = None):
    """Write the activation of aligned rows into `out` [rows, F]; config None = autotune.

    Shapes, dtypes and devices are the caller's contract (moe_expert_shard checks user
    input); here only what would make the kernel read out of bounds is checked.
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: must be one of {ACTIVATIONS}")
    swiglu = activation != "gelu"
    if (activation == "clamped_swiglu") != (clamp is not None and clamp.alpha > 0) or (clamp and not swiglu):
        raise ValueError(f"clamp: {clamp!r}: alpha > 0 exactly with activation='clamped_swiglu' (alpha 0: "
                         "swiglu's biases only; gelu takes none)")
    if swiglu and (w_gate is None or w_gate.shape != w_up.shape or w_gate.stride() != w_up.stride()):
        raise ValueError("w_gate: must be given for swiglu, with w_up's shape and strides")
    T, H = u.shape
    E, Hw, F = w_up.shape
    rows = align.sorted_ids.numel()
    if Hw != H or out.shape != (rows, F) or out.dtype != u.dtype or w_up.dtype != u.dtype:
        raise ValueError(f"u {tuple(u.shape)} {u.dtype}, w_up {tuple(w_up.shape)} {w_up.dtype}, "
                         f"out {tuple(out.shape)} {out.dtype}: need u [T, H], w_up [E, H, F], "
                         f"out [{rows}, F], one dtype")
    if config is not None and align.block_m % config.kwargs["BLOCK_M"]:
        raise ValueError(f"config BLOCK_M={config.kwargs['BLOCK_M']}: must divide the "
                         f"alignment block_m={align.block_m}")
    tuning.check_runnable(_moe_column_kernel, u.device)
    return _launch_column(u, w_gate if swiglu else None, w_up, align, top_k, out, config, clamp)


class Clamp(NamedTuple):
    """The clamped SwiGLU's constants (alpha 0: plain SwiGLU), and the gate/up biases ([E, F] each,
    or None)."""
    alpha: float
    limit: float
    b_gate: torch.Tensor | None = None
    b_up: torch.Tensor | None = None


def _launch_column(u, w_gate, w_up, align: MoeAlignment, top_k: int, out,
                   config: triton.Config | None, clamp: Clamp | None = None):
    """The launch alone (no checks): SwiGLU when w_gate is given, else GELU; `clamp`: the clamped
    SwiGLU when its alpha > 0, and the biases (w_gate given)."""
    T, H = u.shape
    F = w_up.shape[2]
    rows = align.sorted_ids.numel()
    if rows == 0:
        return out
    grid = lambda META: (triton.cdiv(rows, META["BLOCK_M"]) * triton.cdiv(F, META["BLOCK_N"]),)
    args = (u, w_gate if w_gate is not None else w_up, w_up, out, align.sorted_ids,
            align.expert_ids, align.num_padded, T * top_k, H, F, rows, tuning.m_bucket(T),
            u.stride(0), u.stride(1), *w_up.stride(), out.stride(0), out.stride(1))
    bias = clamp is not None and clamp.b_up is not None
    args += ((clamp.b_gate, clamp.b_up, clamp.b_up.stride(0)) if bias else (w_up, w_up, 0)) + (
        (clamp.alpha, clamp.limit) if clamp is not None else (0.0, 0.0))
    meta = dict(TOP_K=top_k, ALIGN_M=align.block_m, SWIGLU=w_gate is not None,
                CLAMPED=clamp is not None and clamp.alpha > 0, HAS_BIAS=bias,
                DOT_PRECISION="ieee" if u.dtype == torch.float32 else None)  # no TF32 for fp32
    count_launch()
    if config is None:
        _autotuned_kernel(u.device)[grid](*args, **meta)
    else:
        _moe_column_kernel[grid](*args, **meta, **config.all_kwargs())
    return out


def moe_column_swiglu(u, w_gate, w_up, align: MoeAlignment, top_k: int, *,
                      activation: str = "swiglu", config: triton.Config | None = None,
                      clamp: Clamp | None = None):
    """Allocate `a` [rows, F] in u.dtype and fill it (see _moe_column_swiglu)."""
    out = torch.empty(align.sorted_ids.numel(), w_up.shape[2], device=u.device, dtype=u.dtype)
    return _moe_column_swiglu(u, w_gate, w_up, align, top_k, out, activation=activation,
                              config=config, clamp=clamp)

