"""The three stage computations, per rank, on the rank's share of the weights.

On CUDA the expert FFN and the stage-2 "residual + partial sums + rmsnorm" run as the
Triton kernels of pyengine.kernels (the output head is one cuBLAS GEMM). On CPU the same
math runs as plain torch (Triton needs a GPU outside its slow interpreter); the kernels
themselves are checked on CPU by tests/kernels under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pyengine import model
from pyengine.spec import DeploymentSpec


def rank_weights(spec: DeploymentSpec, seed: int, rank: int,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Only what `rank` needs: stage 0/2 weights on their GPU, this rank's F columns of the experts."""
    names: list[str] = []
    if rank == spec.stage("embed").gpus[0]:
        names += ["embed", "norm_in", "router"]
    if rank == spec.stage("output").gpus[0]:
        names += ["norm_out", "out"]
    out = {n: model.weight(spec, seed, n, device=device) for n in names}
    for r, start, end in spec.ffn_shards():
        if r == rank:
            for n in ("w_gate", "w_up", "w_down"):
                out[n] = model.weight(spec, seed, n, device=device, cols=(start, end))
    return out


def use_kernels(device: torch.device) -> bool:
    return device.type == "cuda"


def stage0(spec: DeploymentSpec, w: dict[str, torch.Tensor], ids: torch.Tensor):
    """ids [T] -> x [T,H], u [T,H], top-k ids int32 [T,k], top-k weights fp32 [T,k]."""
    x = w["embed"][ids]
    u = model.rmsnorm(x, w["norm_in"], spec.model.norm_eps)
    top_ids, top_w = model.route(u, w["router"], spec.model.top_k)
    return x, u, top_ids, top_w


def stage1(w: dict[str, torch.Tensor], u: torch.Tensor, top_ids: torch.Tensor,
           top_w: torch.Tensor) -> torch.Tensor:
    """This shard's partial y_r [T, H] in u.dtype."""
    if use_kernels(u.device):
        from pyengine.kernels import moe_expert_shard

        # ids come from our own router (in range by construction): skip the range check,
        # whose host sync would stall the asynchronous issue of the pipeline.
        return moe_expert_shard(u, w["w_gate"], w["w_up"], w["w_down"], top_ids, top_w,
                                check_ids=False)
    y = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
    for e in torch.unique(top_ids).tolist():
        tok, slot = (top_ids == e).nonzero(as_tuple=True)
        ue = u[tok]
        a = F.silu(ue @ w["w_gate"][e]) * (ue @ w["w_up"][e])
        y.index_add_(0, tok, (a @ w["w_down"][e]).float() * top_w[tok, slot, None])
    return y.to(u.dtype)


def single_device(spec: DeploymentSpec, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """The whole block on one device with full weights, sequential: logits [T, V] for ids [T]."""
    x, u, top_ids, top_w = stage0(spec, w, ids)
    return stage2(spec, w, x, [stage1(w, u, top_ids, top_w)])


def stage2(spec: DeploymentSpec, w: dict[str, torch.Tensor], x: torch.Tensor,
           partials: list[torch.Tensor]) -> torch.Tensor:
    """logits [T, V] from the residual x and the experts' partial sums."""
    eps = spec.model.norm_eps
    if use_kernels(x.device):
        from pyengine.kernels import fused_residual_rmsnorm

        normed = fused_residual_rmsnorm(x, partials, w["norm_out"], eps)
    else:
        y = torch.stack([p.float() for p in partials]).sum(0)
        normed = model.rmsnorm(x + y.to(x.dtype), w["norm_out"], eps)
    return normed @ w["out"]
