"""Row-parallel grouped GEMM: y_pair = w * (a @ w_down[e][F_r, :] (+ b_down[e])), router weight in
the epilogue (the bias, gpt-oss's, given to one TP shard only: it is added once per pair).

`a` is in aligned row order (from moe_column_swiglu). Two ways to combine a token's k rows:
- deterministic (default): each pair's fp32 row goes to out[pair] ([T*k, H]); the caller
  sums the k rows in a fixed order. Costs a [T*k, H] fp32 round trip (32 MiB at the seed's
  T=1024: small next to the 470 MB of w_down it streams).
- atomic: tl.atomic_add into a zeroed fp32 out [T, H]. The order of the k adds varies run
  to run, so results may differ in the last bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from pyengine.kernels import tuning
from pyengine.kernels.launch_count import count_launch
from pyengine.kernels.tiles import grouped_tile
from pyengine.kernels.moe_align import MoeAlignment


@triton.jit
def _moe_row_kernel(
    a_ptr,  # (max_rows, F) aligned rows
    w_ptr,  # (E, F, H)
    topk_weights_ptr,  # (T * TOP_K,) router weights by pair id
    out_ptr,  # (T * TOP_K, H) fp32 per pair, or (T, H) fp32 zeroed when ATOMIC
    sorted_ids_ptr,  # (max_rows,) int32 pair ids, sentinel = num_pairs
    expert_ids_ptr,  # (max_rows // ALIGN_M,) int32
    num_padded_ptr,  # (1,) int32
    num_pairs, H, F, max_rows, m_bucket,  # m_bucket: autotune key only
    stride_am, stride_af,
    stride_we, stride_wf, stride_wh,
    stride_om, stride_oh,
    bias_ptr, stride_be,  # (E, H) b_down; read only when HAS_BIAS
    TOP_K: tl.constexpr, ALIGN_M: tl.constexpr, ATOMIC: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    pid_m, pid_n = grouped_tile(max_rows, H, BLOCK_M, BLOCK_N, GROUP_M)

    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    if tl.load(sorted_ids_ptr + pid_m * BLOCK_M) >= num_pairs:  # all-padding tile
        return
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ids_ptr + offs_m)
    valid = pair < num_pairs
    expert = tl.load(expert_ids_ptr + (pid_m * BLOCK_M) // ALIGN_M).to(tl.int64)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_af
    w_ptrs = w_ptr + expert * stride_we + offs_k[:, None] * stride_wf + offs_n[None, :] * stride_wh
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(F, BLOCK_K)):
        k_ok = offs_k < F - k0 * BLOCK_K
        x = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < H), other=0.0)
        acc = tl.dot(x, w, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K * stride_af
        w_ptrs += BLOCK_K * stride_wf

    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + offs_n, mask=offs_n < H, other=0.0).to(tl.float32)[None, :]
    route_w = tl.load(topk_weights_ptr + pair, mask=valid, other=0.0).to(tl.float32)
    acc = acc * route_w[:, None]
    mask = valid[:, None] & (offs_n[None, :] < H)
    if ATOMIC:
        tok = tl.where(valid, pair // TOP_K, 0)
        tl.atomic_add(out_ptr + tok[:, None] * stride_om + offs_n[None, :] * stride_oh, acc,
                      mask=mask, sem="relaxed")
    else:
        row = tl.where(valid, pair, 0)
        tl.store(out_ptr + row[:, None] * stride_om + offs_n[None, :] * stride_oh, acc, mask=mask)


def _prune(configs, named_args, **kwargs):
    # Candidates must tile the alignment block exactly and fit the device's shared memory.
    a = named_args["a_ptr"]
    return tuning.prune_configs("row", configs, kwargs["ALIGN_M"], a.dtype, tuning.launch_arch(a))


_autotuned = {}


def _autotuned_kernel(device: torch.device, atomic: bool):
    key = (device.type, atomic)
    if key not in _autotuned:
        # Atomic mode accumulates into out: every benchmarked config must start from zeros.
        _autotuned[key] = triton.autotune(
            configs=tuning.moe_configs("row", device), key=["H", "F", "m_bucket"],
            reset_to_zero=["out_ptr"] if atomic else None,
            prune_configs_by={"early_config_prune": _prune})(_moe_row_kernel)
    return _autotuned[key]


def _moe_row_down(a, w_down, topk_weights, align: MoeAlignment, top_k: int, out, *,
                  deterministic: bool = True, config: triton.Config | None = None):
    """out[pair] = w_pair * (a[row] @ w_down[e]) (deterministic, out [T*k, H] fp32), or
    out[tok] += the same (atomic, out [T, H] fp32, zeroed by the caller). config None = autotune.

    topk_weights: [T, k] or [T*k], any float dtype. Shapes/dtypes are the caller's contract
    (moe_expert_shard checks user input); only what could index out of bounds is checked.
    """
    rows, F = a.shape
    E, Fw, H = w_down.shape
    num_pairs = topk_weights.numel()
    want = (num_pairs if deterministic else num_pairs // top_k, H)
    if Fw != F or rows != align.sorted_ids.numel() or tuple(out.shape) != want \
            or out.dtype != torch.float32 or a.dtype != w_down.dtype:
        raise ValueError(f"a {tuple(a.shape)} {a.dtype}, w_down {tuple(w_down.shape)} "
                         f"{w_down.dtype}, out {tuple(out.shape)} {out.dtype}: need a "
                         f"[{align.sorted_ids.numel()}, F], w_down [E, F, H] of a's dtype, "
                         f"out {list(want)} float32")
    if config is not None and align.block_m % config.kwargs["BLOCK_M"]:
        raise ValueError(f"config BLOCK_M={config.kwargs['BLOCK_M']}: must divide the "
                         f"alignment block_m={align.block_m}")
    tuning.check_runnable(_moe_row_kernel, a.device)
    return _launch_row(a, w_down, topk_weights.reshape(-1), align, top_k, out, deterministic, config)


def _launch_row(a, w_down, topk_weights, align: MoeAlignment, top_k: int, out,
                deterministic: bool, config: triton.Config | None, bias: torch.Tensor | None = None):
    """The launch alone (no checks); topk_weights flat [T*k]; bias: b_down [E, H] or None."""
    rows, F = a.shape
    H = w_down.shape[2]
    num_pairs = topk_weights.numel()
    if rows == 0:
        return out
    grid = lambda META: (triton.cdiv(rows, META["BLOCK_M"]) * triton.cdiv(H, META["BLOCK_N"]),)
    args = (a, w_down, topk_weights, out, align.sorted_ids, align.expert_ids,
            align.num_padded, num_pairs, H, F, rows, tuning.m_bucket(num_pairs // top_k),
            a.stride(0), a.stride(1), *w_down.stride(), out.stride(0), out.stride(1),
            w_down if bias is None else bias, 0 if bias is None else bias.stride(0))
    meta = dict(TOP_K=top_k, ALIGN_M=align.block_m, ATOMIC=not deterministic, HAS_BIAS=bias is not None,
                DOT_PRECISION="ieee" if a.dtype == torch.float32 else None)  # no TF32 for fp32
    count_launch()
    if config is None:
        _autotuned_kernel(a.device, not deterministic)[grid](*args, **meta)
    else:
        _moe_row_kernel[grid](*args, **meta, **config.all_kwargs())
    return out


def moe_row_down(a, w_down, topk_weights, align: MoeAlignment, top_k: int, *,
                 deterministic: bool = True, config: triton.Config | None = None,
                 left_out: bool = False):
    """y_r [T, H] fp32: the k weighted pair rows of each token summed (fixed order, or atomics).
    left_out: some pairs are in no run (id -1), so their rows are zeroed, not written."""
    num_pairs = topk_weights.numel()
    T, H = num_pairs // top_k, w_down.shape[2]
    if deterministic:
        alloc = torch.zeros if left_out else torch.empty
        per_pair = alloc(num_pairs, H, device=a.device, dtype=torch.float32)
        _moe_row_down(a, w_down, topk_weights, align, top_k, per_pair, config=config)
        return per_pair.view(T, top_k, H).sum(dim=1)  # torch reductions have a fixed order
    out = torch.zeros(T, H, device=a.device, dtype=torch.float32)
    return _moe_row_down(a, w_down, topk_weights, align, top_k, out, deterministic=False,
                         config=config)
