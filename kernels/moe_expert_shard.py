"""One TP shard of the MoE block: y_r = sum over chosen (e, w) of w * act(u) @ w_down[e][F_r].

align -> column GEMM (+ SwiGLU/GELU) -> row GEMM (+ router weight) -> k-sum and cast. The
shards' y_r add up to the full block's output (the caller reduces them; see residual_rmsnorm).

`ExpertShard` is the hot path: it checks the static shapes once, picks the GEMM configs once
per token bucket, keeps the alignment and scratch buffers, and its call is exactly four
Triton launches (align, column, row, k-sum; deterministic mode) with no validation and no
host sync, so a CUDA graph can capture it. `moe_expert_shard` validates everything and
allocates: the entry point for callers that are not on a hot path.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton

from pyengine.kernels import tuning
from pyengine.kernels.decode_configs import DECODE_MAX_TOKENS
from pyengine.kernels.moe_align import (MoeAlignment, _moe_align_block_size, _moe_align_kernel,
                                        alignment_view, empty_alignment, max_padded_rows)
from pyengine.kernels.moe_column_swiglu import ACTIVATIONS, Clamp, _launch_column, _moe_column_kernel
from pyengine.kernels.moe_row_down import _launch_row, _moe_row_kernel
from pyengine.kernels.moe_sum_pairs import _launch_sum_pairs, _moe_sum_pairs_kernel

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class ShardPlan(NamedTuple):
    """The GEMM configs (None: autotune) and the alignment block they share, for one bucket."""
    column: triton.Config | None
    row: triton.Config | None
    block_m: int


class _Scratch(NamedTuple):
    """Buffers for up to `tokens` tokens at one alignment block."""
    tokens: int
    align: MoeAlignment
    a: torch.Tensor  # (max rows, F) activations in aligned row order
    per_pair: torch.Tensor  # (tokens * k, H) fp32 weighted pair rows (deterministic mode)


class ExpertShard:
    """A prepared expert shard: E experts, hidden H, this shard's F (F_r), top_k, dtype, device.

    activation "swiglu" (w_gate used) or "gelu" (w_gate None); skip_ids: an id of -1 marks a
    choice held by another GPU; deterministic=False sums the k rows with fp32 atomics (then a
    call is 3 Triton launches plus a zero fill and a cast).
    """

    def __init__(self, E: int, H: int, F: int, top_k: int, dtype: torch.dtype,
                 device: torch.device | str, *, activation: str = "swiglu",
                 skip_ids: bool = False, deterministic: bool = True, bias: bool = False,
                 alpha: float = 1.702, limit: float = 7.0):
        for name, value in (("E", E), ("H", H), ("F", F), ("top_k", top_k)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}: must be an int >= 1")
        if top_k > E and not skip_ids:  # with skipped (-1) choices a GPU may hold fewer than k
            raise ValueError(f"top_k={top_k}: must be <= E={E}")
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype={dtype}: must be one of {FLOAT_DTYPES}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation={activation!r}: must be one of {ACTIVATIONS}")
        if bias and activation == "gelu":
            raise ValueError("bias=True: the expert biases (gate, up, down) need a gated activation, not gelu")
        self.bias, self.alpha, self.limit = bias, float(alpha), float(limit)
        self.E, self.H, self.F, self.top_k, self.dtype = E, H, F, top_k, dtype
        self.device = torch.device(device)
        self.activation, self.skip_ids, self.deterministic = activation, skip_ids, deterministic
        for kernel in (_moe_align_kernel, _moe_column_kernel, _moe_row_kernel, _moe_sum_pairs_kernel):
            tuning.check_runnable(kernel, self.device)
        self._plans: dict[int, ShardPlan] = {}
        self._scratch: dict[int, _Scratch] = {}  # by block_m

    def plan(self, num_tokens: int) -> ShardPlan:
        """Configs for num_tokens, chosen once per bucket: each decode count up to
        DECODE_MAX_TOKENS (the decode tiles depend on it), else tuning.m_bucket."""
        key = num_tokens if num_tokens <= DECODE_MAX_TOKENS else tuning.m_bucket(num_tokens)
        plan = self._plans.get(key)
        if plan is None:
            shape = dict(device=self.device, dtype=self.dtype, E=self.E, H=self.H, F=self.F,
                         num_tokens=num_tokens, top_k=self.top_k)
            col = tuning.select_config("column", **shape)
            row = tuning.select_config("row", **shape)
            plan = self._plans[key] = ShardPlan(col, row, tuning.align_block_m(col, row, self.device,
                                                                               self.dtype))
        return plan

    def reserve(self, num_tokens: int) -> None:
        """Allocate the buffers for up to num_tokens now (before a CUDA graph capture: buffers
        never move once a count fits)."""
        self._buffers(num_tokens, self.plan(num_tokens).block_m)

    def check(self, u, w_gate, w_up, w_down, topk_ids, topk_weights) -> None:
        """Validate one call's arguments against this shard (the call itself checks nothing)."""
        E, F, H = _check_inputs(u, w_gate, w_up, w_down, topk_ids, topk_weights,
                                self.activation, self.skip_ids)
        got = dict(E=E, H=H, F=F, top_k=topk_ids.shape[1])
        for name, value in got.items():
            if value != getattr(self, name):
                raise ValueError(f"{name}={value} (from the arguments' shapes): must equal "
                                 f"the prepared {name}={getattr(self, name)}")
        if u.dtype != self.dtype or u.device != self.device:
            raise ValueError(f"u: dtype {u.dtype} on {u.device}: must be the prepared "
                             f"{self.dtype} on {self.device}")
        for name, t in (("topk_ids", topk_ids), ("topk_weights", topk_weights)):
            if not t.is_contiguous():
                raise ValueError(f"{name}.stride()={t.stride()}: must be contiguous")

    def __call__(self, u, w_gate, w_up, w_down, topk_ids, topk_weights, out=None, *,
                 b_gate=None, b_up=None, b_down=None):
        """y_r [T, H] in u.dtype (into `out` when given). No validation (see check). With `bias`:
        b_gate, b_up [E, F_r] and b_down [E, H] (zeros on all but one TP shard)."""
        T = u.shape[0]
        if out is None:
            out = torch.empty(T, self.H, device=u.device, dtype=u.dtype)
        if T == 0:
            return out
        plan = self.plan(T)
        scratch = self._buffers(T, plan.block_m)
        num_pairs = T * self.top_k
        align = alignment_view(scratch.align, num_pairs)
        a = scratch.a[:align.sorted_ids.numel()]
        gate = w_gate if self.activation != "gelu" else None
        clamped = self.activation == "clamped_swiglu"
        clamp = Clamp(self.alpha if clamped else 0.0, self.limit, b_gate, b_up) if clamped or self.bias else None
        _moe_align_block_size(topk_ids, self.E, plan.block_m, align)
        _launch_column(u, gate, w_up, align, self.top_k, a, plan.column, clamp)
        weights = topk_weights.reshape(-1)
        if self.deterministic:
            per_pair = scratch.per_pair[:num_pairs]
            _launch_row(a, w_down, weights, align, self.top_k, per_pair, True, plan.row, b_down)
            return _launch_sum_pairs(per_pair, topk_ids, out, self.top_k, self.skip_ids)
        summed = torch.zeros(T, self.H, device=u.device, dtype=torch.float32)
        _launch_row(a, w_down, weights, align, self.top_k, summed, False, plan.row, b_down)
        return out.copy_(summed)

    def _buffers(self, num_tokens: int, block_m: int) -> _Scratch:
        have = self._scratch.get(block_m)
        if have is None or have.tokens < num_tokens:
            pairs = num_tokens * self.top_k
            rows = max_padded_rows(pairs, self.E, block_m)
            dev = self.device
            per_pair = torch.empty(pairs if self.deterministic else 0, self.H, device=dev,
                                   dtype=torch.float32)
            have = self._scratch[block_m] = _Scratch(
                num_tokens, empty_alignment(pairs, self.E, block_m, dev),
                torch.empty(rows, self.F, device=dev, dtype=self.dtype), per_pair)
        return have


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
    path whose router already guarantees the range (better: an ExpertShard).
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
    shard = ExpertShard(E, H, F, k, u.dtype, u.device, activation=activation, skip_ids=skip_ids,
                        deterministic=deterministic)
    return shard(u, w_gate, w_up, w_down, topk_ids.contiguous(), topk_weights.contiguous())


def _check_inputs(u, w_gate, w_up, w_down, topk_ids, topk_weights, activation, skip_ids=False):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation={activation!r}: must be one of {ACTIVATIONS}")
    named = {"u": u, "w_up": w_up, "w_down": w_down, "topk_ids": topk_ids,
             "topk_weights": topk_weights}
    if activation != "gelu":
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
