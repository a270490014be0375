"""The torch path of the stages' kernels: plain torch ops, the reference path on CPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from pyengine.model.expert_act import SWIGLU, ExpertActivation
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
              correction: torch.Tensor | None = None, bias: torch.Tensor | None = None):
        """Softmax top-k (`bias`: the router's own per-expert bias on its logits), or with `grouped`
        (a GroupedRoutingSpec) DeepSeek-V3's grouped sigmoid routing with its selection-only
        `correction` bias."""
        if grouped is not None:
            return route_grouped(u, router, k, renormalize, grouped, correction)
        return route(u, router, k, renormalize, bias)

    def experts(self, w: Mapping[str, Any], u: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                skip_ids: bool = False, static: bool = False, act: ExpertActivation = SWIGLU) -> torch.Tensor:
        """This shard's partial [t, H] in u.dtype: every held expert in turn (ids of -1: held
        elsewhere, in no expert's rows), each token's choices summed in fp32. `static` (a decode
        step, a few rows): every held expert over every row, weighted by a dense gate matrix (a
        zero where not chosen): the same ops whatever the routing, no host sync. `act`: the
        stage's activation and biases (pyengine.model.expert_act)."""
        if static:
            return _dense_experts(w, u, ids, weights, act)
        y = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
        for e in range(w["w_up"].shape[0]):
            tok, slot = (ids == e).nonzero(as_tuple=True)
            ue = u[tok]
            gate, up = ue @ w["w_gate"][e], ue @ w["w_up"][e]
            if act.bias:
                gate, up = gate + w["b_gate"][e], up + w["b_up"][e]
            down = act(gate, up) @ w["w_down"][e]
            if act.bias:
                down = down + w["b_down"][e]
            y.index_add_(0, tok, down.float() * weights[tok, slot, None])
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


def _dense_experts(w, u: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, act: ExpertActivation) -> torch.Tensor:
    e = w["w_up"].shape[0]
    gate = torch.zeros(u.shape[0], e + 1, dtype=torch.float32, device=u.device)  # column e: held elsewhere
    gate.scatter_add_(1, torch.where(ids < 0, e, ids).long(), weights.float())
    g, up = torch.matmul(u, w["w_gate"]), torch.matmul(u, w["w_up"])  # [E, t, F]
    if act.bias:
        g, up = g + w["b_gate"][:, None, :], up + w["b_up"][:, None, :]
    out = torch.bmm(act(g, up), w["w_down"])  # [E, t, H]
    if act.bias:
        out = out + w["b_down"][:, None, :]
    return torch.einsum("eth,te->th", out.float(), gate[:, :e]).to(u.dtype)
