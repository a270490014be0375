"""The unit of the roofline: one kernel's FLOPs and HBM bytes (a multiply-add counts as 2 FLOPs;
element-wise work shows up as bytes, not FLOPs), and what kind of kernel it is, so that the device
profile (pyengine.predict.devices) can choose the efficiency it reaches:

  GEMM     a dense GEMM with `rows` = M (its token rows); efficiency gemm_efficiency, a function
           of M when the profile has gemm_half_rows > 0.
  GROUPED  a grouped expert GEMM with `rows` = rows per expert it touches (pairs / experts
           touched); efficiency grouped_gemm_efficiency x rows / (rows + grouped_gemm_half_rows).
  MEMORY   memory-bound (norms, gathers, RoPE, element-wise): priced by its bytes only.

A kernel built with three fields (name, FLOPs, bytes) keeps the plain roofline meaning: a GEMM
whose efficiency does not depend on its rows. Adding a kernel to a stage is one entry in its
`kernels(tokens, rank)`; for example an attention block would add

    KernelCost.gemm("qkv_proj", t, (heads + 2 * kv_heads) * head_dim, h, elem)   # M = t rows
    KernelCost.gemm("o_proj", t, h, heads * head_dim, elem)
    KernelCost("attention_core", 2 * t * t * heads * head_dim,                     # causal QK^T + PV
               (t * (heads + 2 * kv_heads) * head_dim + t * heads * head_dim) * elem,
               kind=KernelKind.GEMM, rows=t)
    KernelCost.memory("rmsnorm_attn", 2 * t * h * elem + h * elem)
    KernelCost.memory("rope", 2 * t * (heads + kv_heads) * head_dim * elem)

(prefill and decode alike: decode is `tokens` = the batch's new tokens, with the KV cache read
counted in the attention core's bytes).
"""

from __future__ import annotations

import enum
from typing import NamedTuple


class KernelKind(enum.Enum):
    GEMM = "gemm"
    GROUPED = "grouped"
    MEMORY = "memory"


class KernelCost(NamedTuple):
    name: str
    flops: float
    hbm_bytes: float
    kind: KernelKind = KernelKind.GEMM
    rows: float | None = None
    """M of a dense GEMM, rows per touched expert of a grouped GEMM; None: rows do not matter."""

    @classmethod
    def gemm(cls, name: str, m: float, n: float, k: float, elem: int) -> KernelCost:
        """[m, k] @ [k, n] -> [m, n]: 2mnk FLOPs; A, B read and C written once, `elem` bytes each."""
        return cls(name, 2.0 * m * n * k, (m * k + k * n + m * n) * elem, KernelKind.GEMM, m)

    @classmethod
    def grouped(cls, name: str, flops: float, hbm_bytes: float, rows_per_expert: float) -> KernelCost:
        return cls(name, flops, hbm_bytes, KernelKind.GROUPED, rows_per_expert)

    @classmethod
    def memory(cls, name: str, hbm_bytes: float) -> KernelCost:
        return cls(name, 0.0, hbm_bytes, KernelKind.MEMORY)
