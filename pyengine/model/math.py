"""Numerical building blocks of the stages (torch): RMSNorm and the top-k router.

Tests check these against closed forms and against transformers' modules; the single-device
reference used by `pyengine run`'s output check (pyengine.model.reference) does not call them.
"""

from __future__ import annotations

import torch


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * w, computed in fp32, returned in x.dtype."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def route(u: torch.Tensor, router: torch.Tensor, k: int, renormalize: bool = True,
          bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (fp32) of u @ router (+ bias), top-k, renormalised to sum to 1
    unless `renormalize` is False (norm_topk_prob = false keeps the chosen experts' raw
    probabilities): (ids int32 [T,k], weights fp32 [T,k]). Renormalised, the weights are the
    softmax over the chosen logits alone (gpt-oss's router).

    Ties between equal probabilities go to the lower expert id (a stable descending sort):
    torch.topk promises no order on ties, and the references (pyengine.model.reference,
    tests/references.py) break them this way, so an exact tie cannot fail the output check."""
    logits = u @ router if bias is None else torch.addmm(bias, u, router)
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    w, ids = sorted_p[..., :k].contiguous(), order[..., :k]  # a slice of the sort: sent as is, so dense
    return ids.to(torch.int32).contiguous(), (w / w.sum(-1, keepdim=True) if renormalize else w)


def route_grouped(u: torch.Tensor, router: torch.Tensor, k: int, renormalize: bool, grouped,
                  correction: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's router (`grouped`: a GroupedRoutingSpec): s = sigmoid(u @ router) in fp32 (the
    checkpoints keep the gate in fp32); the choice ranks s + correction (the bias never enters a
    weight); groups of E / n_group experts ranked by the sum of their two best biased scores (one for
    a group of one), the topk_group best kept; the top k among their experts; weights = the chosen
    s, divided by their sum + 1e-20 when `renormalize`, times routed_scaling_factor. Ties go to the
    lower id, groups too (stable descending sorts): (ids int32 [T,k], weights fp32 [T,k])."""
    s = torch.sigmoid(u.float() @ router.float())
    choice = s + correction.float() if correction is not None else s
    t, e = s.shape
    size = e // grouped.n_group
    by_group = choice.view(t, grouped.n_group, size)
    group_score = by_group.topk(min(2, size), dim=-1).values.sum(-1)
    best_groups = torch.sort(group_score, dim=-1, descending=True, stable=True)[1][:, :grouped.topk_group]
    keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best_groups, True)
    choice = choice.masked_fill(~keep.repeat_interleave(size, dim=1), float("-inf"))
    ids = torch.sort(choice, dim=-1, descending=True, stable=True)[1][:, :k]
    w = s.gather(1, ids)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return ids.to(torch.int32).contiguous(), (w * grouped.routed_scaling_factor).contiguous()


def add_partials_and_norm(x: torch.Tensor, partials: list, w: torch.Tensor, eps: float,
                          keep_residual: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(h, rmsnorm(h) * w) with h = x + sum(partials): the partials summed in fp32, in order,
    rounded once to x.dtype. On CUDA one fused Triton kernel reads every input once; h is
    written only when `keep_residual` (the next layer needs it; the output head does not)."""
    if x.device.type == "cuda":
        from pyengine.kernels.residual_rmsnorm import fused_residual_rmsnorm

        if keep_residual:
            return fused_residual_rmsnorm(x, partials, w, eps, return_residual=True)
        return None, fused_residual_rmsnorm(x, partials, w, eps)
    y = torch.stack([p.float() for p in partials]).sum(0)
    h = x + y.to(x.dtype)
    return (h if keep_residual else None), rmsnorm(h, w, eps)
