"""The kernels a rank's stage computes launch, chosen once per rank: the torch path or the Triton path.

`PYENGINE_KERNELS` = auto (default: Triton on CUDA, torch on CPU) | torch | triton. `triton` on CPU
runs the Triton kernels under the interpreter (`TRITON_INTERPRET=1`, set before pyengine.kernels is
first imported), so the decode step a GPU runs is the one CI tests and counts (bf16 excepted: the
interpreter's bf16 dot is wrong). Both paths read the same static state (the KV cache, the RoPE
tables, the chunk tables); the stages call one `Ops` object and never ask which path it is.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from typing import Any

import torch

from pyengine.core.errors import InputError
from pyengine.model.math import rmsnorm, route

ENV = "PYENGINE_KERNELS"
CHOICES = ("auto", "torch", "triton")


class KernelPath(str, enum.Enum):
    TORCH = "torch"
    TRITON = "triton"


def kernel_path(device: torch.device) -> KernelPath:
    """The path for `device` under PYENGINE_KERNELS (checked: one line naming the variable)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in CHOICES:
        raise InputError(ENV, value, f"must be one of {', '.join(CHOICES)}")
    if value == "auto":
        return KernelPath.TRITON if device.type == "cuda" else KernelPath.TORCH
    if value == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(ENV, value, f"the Triton path on {device.type} needs the Triton interpreter "
                         "(TRITON_INTERPRET=1, set before pyengine.kernels is first imported)")
    return KernelPath(value)


class TorchOps:
    """Plain torch: the reference path on CPU. Its launch count per decode step does not depend on
    the number of sequences (every loop runs over experts or segments, never over sequences)."""

    path = KernelPath.TORCH

    def residual_norm(self, x: torch.Tensor, partials: list, w: torch.Tensor, eps: float,
                      keep_residual: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(h, rmsnorm(h) * w), h = x + the partials summed in fp32 in order, rounded once."""
        y = torch.stack([p.float() for p in partials]).sum(0)
        h = x + y.to(x.dtype)
        return (h if keep_residual else None), rmsnorm(h, w, eps)

    def route(self, u: torch.Tensor, router: torch.Tensor, k: int, renormalize: bool):
        return route(u, router, k, renormalize)

    def experts(self, w: Mapping[str, Any], u: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                skip_ids: bool = False) -> torch.Tensor:
        """This shard's partial [t, H] in u.dtype: every held expert in turn (ids of -1: held
        elsewhere, in no expert's rows), each token's choices summed in fp32."""
        import torch.nn.functional as F

        y = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
        for e in range(w["w_up"].shape[0]):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            ue = u[tok]
            a = F.silu(ue @ w["w_gate"][e]) * (ue @ w["w_up"][e])
            y.index_add_(0, tok, (a @ w["w_down"][e]).float() * weights[tok, slot, None])
        return y.to(u.dtype)

    def decode_tables(self, cache, rope, meta: torch.Tensor, dtype: torch.dtype, key_blocks: int):
        """A static decode group's chunk tables from its rows' metadata [3, b] (made every step)."""
        from pyengine.model.attention import chunk_tables

        return chunk_tables(cache, rope, None, meta, dtype, key_blocks)

    def attention(self, model, w: Mapping[str, torch.Tensor], a: torch.Tensor, cache, layer: int, chunk,
                  tables) -> torch.Tensor:
        from pyengine.model.attention import attention_torch

        return attention_torch(model, w, a, cache, layer, chunk, tables)


def ops_for(spec, device: torch.device, path: KernelPath | None = None):
    """The rank's ops (made once per runtime: the Triton path prepares its kernels here)."""
    path = path or kernel_path(device)
    if path is KernelPath.TORCH:
        return TorchOps()
    from pyengine.model.ops_triton import TritonOps

    return TritonOps(spec, device)
