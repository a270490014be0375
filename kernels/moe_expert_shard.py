"""One TP shard of the MoE block: y_r = sum over chosen (e, w) of w * act(u) @ w_down[e][F_r].

align -> column GEMM (+ SwiGLU/GELU) -> row GEMM (+ router weight, k-sum). The shards'
y_r add up to the full block's output (the caller reduces them; see residual_rmsnorm).
"""

from __future__ import annotations

import torch

from pyengine.kernels import tuning
from pyengine.kernels.moe_align import empty_alignment, _moe_align_block_size
from pyengine.kernels.moe_column_swiglu import ACTIVATIONS, moe_column_swiglu
from pyengine.kernels.moe_row_down import moe_row_down

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def moe_expert_shard(u: torch.Tensor, w_gate: torch.Tensor | None, w_up: torch.Tensor,
                     w_down: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                     *, activation: str = "swiglu", deterministic: bool = True,
                     check_ids: bool = True, skip_ids: bool = False) -> torch.Tensor:
    """Partial MoE output y_r [T, H] in u.dtype for this shard's F_r slice of the experts.

    u [T, H]; w_gate, w_up [E, H, F_r]; w_down [E, F_r, H] (fp16/bf16/fp32, all u.dtype, any
    strides: the kernels take strides, though non-unit inner strides are slow);
    topk_ids [T, k] int32/int64 in [0, E); topk_weights [T, k] float (any float dtype).
    activation "swiglu" uses w_gate; "gelu" computes gelu(u @ w_up[e]) and needs w_gate=None.
    deterministic=False sums the k rows with fp32 atomics (faster, last bits may vary).
    check_ids=True range-checks topk_ids, which costs one host sync; pass False on a hot
    path whose router already guarantees the range.
    skip_ids=True: an id of -1 marks a choice held by another GPU (expert parallel): it adds
    nothing, and a token with no id here gets a zero row. Without it ids must lie in [0, E).
    """
    E, F, H = _check_inputs(u, w_gate, w_up, w_down, topk_ids, topk_weights, activation, skip_ids)
    T, k = topk_ids.shape
    if T * k == 0:
        return torch.zeros(T, H, device=u.device, dtype=u.dtype)
    if check_ids:
        lo, hi = torch.aminmax(topk_ids)
        lo, hi = int(lo), int(hi)
        low = -1 if skip_ids else 0
        if lo < low or hi >= E:
            rule = f"-1 (skipped) or [0, E={E})" if skip_ids else f"[0, E={E})"
            raise ValueError(f"topk_ids: values span [{lo}, {hi}]; must lie in {rule}")
    shape = dict(device=u.device, dtype=u.dtype, E=E, H=H, F=F, num_tokens=T, top_k=k)
    col_cfg = tuning.select_config("column", **shape)
    row_cfg = tuning.select_config("row", **shape)
    block_m = tuning.align_block_m(col_cfg, row_cfg, u.device, u.dtype)
    align = _moe_align_block_size(topk_ids, E, block_m, empty_alignment(T * k, E, block_m, u.device))
    a = moe_column_swiglu(u, w_gate, w_up, align, k, activation=activation, config=col_cfg)
    y = moe_row_down(a, w_down, topk_weights, align, k, deterministic=deterministic, config=row_cfg,
                     left_out=skip_ids)
    return y.to(u.dtype)


def _check_inputs(u, w_gate, w_up, w_down, topk_ids, topk_weights, activation, skip_ids=False):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: must be one of {ACTIVATIONS}")
    named = {"u": u, "w_up": w_up, "w_down": w_down, "topk_ids": topk_ids,
             "topk_weights": topk_weights}
    if activation == "swiglu":
        named["w_gate"] = w_gate
    elif w_gate is not None:
        raise ValueError("w_gate: must be None for activation='gelu' (GELU has no gate)")
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: got {type(t).__name__}; must be a torch.Tensor")
    if u.dtype not in FLOAT_DTYPES:
        raise TypeError(f"u.dtype={u.dtype}: must be one of {FLOAT_DTYPES}")
    for name in ("w_gate", "w_up", "w_down"):
        if name in named and named[name].dtype != u.dtype:
            raise TypeError(f"{name}.dtype={named[name].dtype}: must equal u.dtype={u.dtype}")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids.dtype={topk_ids.dtype}: must be torch.int32 or torch.int64")
    if not topk_weights.is_floating_point():
        raise TypeError(f"topk_weights.dtype={topk_weights.dtype}: must be a float dtype")
    for name, t in named.items():
        if t.device != u.device:
            raise ValueError(f"{name}.device={t.device}: must equal u.device={u.device}")
    dims = {"u": 2, "w_gate": 3, "w_up": 3, "w_down": 3, "topk_ids": 2, "topk_weights": 2}
    for name, t in named.items():
        if t.dim() != dims[name]:
            raise ValueError(f"{name}.shape={tuple(t.shape)}: must have {dims[name]} dims")
    T, H = u.shape
    E, H_up, F = w_up.shape
    rules = [("w_up", w_up.shape, (E, H, F), "[E, H, F_r] with H = u.shape[1]"),
             ("w_down", w_down.shape, (E, F, H), "[E, F_r, H] matching w_up"),
             ("topk_ids", topk_ids.shape[:1], (T,), "[T, k] with T = u.shape[0]"),
             ("topk_weights", topk_weights.shape, topk_ids.shape, "equal to topk_ids.shape")]
    if "w_gate" in named:
        rules.insert(0, ("w_gate", w_gate.shape, (E, H, F), "equal to w_up.shape"))
    for name, got, want, rule in rules:
        if tuple(got) != tuple(want):
            raise ValueError(f"{name}.shape={tuple(named[name].shape)}: must be {rule}")
    k = topk_ids.shape[1]
    if k > E and not skip_ids:  # with skipped (-1) choices a GPU may hold fewer experts than k
        raise ValueError(f"topk_ids.shape[1]={k}: top-k must be <= E={E}")
    if E == 0 or F == 0 or H == 0:
        raise ValueError(f"w_up.shape={tuple(w_up.shape)}: E, H and F_r must be >= 1")
    if "w_gate" in named and w_gate.stride() != w_up.stride():
        raise ValueError(f"w_gate.stride()={w_gate.stride()}: must equal w_up.stride()="
                         f"{w_up.stride()} (the kernel shares one stride set)")
    return E, F, H
