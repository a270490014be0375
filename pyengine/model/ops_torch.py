"""The torch path of the stages' kernels: plain torch ops, the reference path on CPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pyengine.model.kernel_path import KernelPath
from pyengine.model.math import rmsnorm, route, route_grouped


class TorchOps:
    """Plain torch: the reference path on CPU. Its launch count per decode step does not depend on
    the number of sequences (every loop runs over experts or segments, never over sequences)."""

    path = KernelPath.TORCH
    graphable = False
    """Its decode step has no data-dependent shape or host sync (a CUDA graph may capture it)."""
    not_graphable = "the decode attention gathers the longest sequence's blocks (a length the host picks " \
                    "each step) and the experts list each expert's tokens (a host sync)"

    def residual_norm(self, x: torch.Tensor, partials: list, w: torch.Tensor, eps: float,
                      keep_residual: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(h, rmsnorm(h) * w), h = x + the partials summed in fp32 in order, rounded once."""
        y = torch.stack([p.float() for p in partials]).sum(0)
        h = x + y.to(x.dtype)
        return (h if keep_residual else None), rmsnorm(h, w, eps)

    def norm(self, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        return rmsnorm(x, w, eps)

    def route(self, u: torch.Tensor, router: torch.Tensor, k: int, renormalize: bool, grouped=None,
              correction: torch.Tensor | None = None):
        """Softmax top-k, or with `grouped` (a GroupedRoutingSpec) DeepSeek-V3's grouped sigmoid
        routing with its selection-only `correction` bias."""
        if grouped is not None:
            return route_grouped(u, router, k, renormalize, grouped, correction)
        return route(u, router, k, renormalize)

    def experts(self, w: Mapping[str, Any], u: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                skip_ids: bool = False, static: bool = False) -> torch.Tensor:
        """This shard's partial [t, H] in u.dtype: every held expert in turn (ids of -1: held
        elsewhere, in no expert's rows), each token's choices summed in fp32. `static` (a decode
        step, a few rows): every held expert over every row, weighted by a dense gate matrix (a
        zero where not chosen): the same ops whatever the routing, no host sync."""
        import torch.nn.functional as F

        if static:
            return _dense_experts(w, u, ids, weights)
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
        if model.mla is not None:
            from pyengine.model.attention_mla import mla_attention_torch

            return mla_attention_torch(model, w, a, cache, layer, chunk, tables)
        from pyengine.model.attention import attention_torch

        return attention_torch(model, w, a, cache, layer, chunk, tables)


def _dense_experts(w, u: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    import torch.nn.functional as F

    e = w["w_up"].shape[0]
    gate = torch.zeros(u.shape[0], e + 1, dtype=torch.float32, device=u.device)  # column e: held elsewhere
    gate.scatter_add_(1, torch.where(ids < 0, e, ids).long(), weights.float())
    a = F.silu(torch.matmul(u, w["w_gate"])) * torch.matmul(u, w["w_up"])  # [E, t, F]
    out = torch.bmm(a, w["w_down"]).float()  # [E, t, H]
    return torch.einsum("eth,te->th", out, gate[:, :e]).to(u.dtype)
