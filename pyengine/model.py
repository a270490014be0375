"""The MoE block of DESIGN.md: deterministic weights and the single-device reference.

The reference is written the obvious way (a loop over experts on the full F) so that the
pipelined, sharded execution is checked against something that shares none of its tricks.
"""

from __future__ import annotations

import zlib

import torch

from pyengine.spec import DeploymentSpec

WEIGHT_NAMES = ("embed", "norm_in", "router", "w_gate", "w_up", "w_down", "norm_out", "out")

TORCH_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(spec: DeploymentSpec) -> torch.dtype:
    return TORCH_DTYPES[spec.model.dtype]


def _shapes(spec: DeploymentSpec) -> dict[str, tuple[int, ...]]:
    m = spec.model
    h, f, e, v = m.hidden_size, m.ffn_hidden_size, m.num_experts, m.vocab_size
    return {"embed": (v, h), "norm_in": (h,), "router": (h, e), "w_gate": (e, h, f),
            "w_up": (e, h, f), "w_down": (e, f, h), "norm_out": (h,), "out": (h, v)}


def _generator(seed: int, name: str, index: int = 0) -> torch.Generator:
    # One stream per (tensor, expert): a shard can be made without the whole tensor,
    # and CPU generation makes the values identical on every backend.
    g = torch.Generator(device="cpu")
    g.manual_seed((seed * 1_000_003 + zlib.crc32(f"{name}/{index}".encode())) % (2**63))
    return g


def _make(spec: DeploymentSpec, seed: int, name: str, index: int = 0) -> torch.Tensor:
    """fp32 values of one tensor (or of expert `index` of a per-expert tensor)."""
    shape = _shapes(spec)[name]
    if name in ("w_gate", "w_up", "w_down"):
        shape = shape[1:]
    g = _generator(seed, name, index)
    if name in ("norm_in", "norm_out"):
        return 1.0 + 0.1 * torch.randn(shape, generator=g)
    fan_in = {"embed": 1, "router": shape[0], "w_gate": shape[0], "w_up": shape[0],
              "w_down": shape[0], "out": shape[0]}[name]
    return torch.randn(shape, generator=g) / fan_in**0.5


def init_weights(spec: DeploymentSpec, seed: int = 0, *, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Full, unsharded weights under WEIGHT_NAMES. Same seed, same values on any backend."""
    return {name: weight(spec, seed, name, device=device, dtype=dtype) for name in WEIGHT_NAMES}


def weight(spec: DeploymentSpec, seed: int, name: str, *, device: torch.device | str = "cpu",
           dtype: torch.dtype | None = None, cols: tuple[int, int] | None = None) -> torch.Tensor:
    """One weight; for w_gate/w_up/w_down, `cols` = (f_start, f_end) selects a TP shard of F."""
    dtype = dtype or torch_dtype(spec)
    if name not in ("w_gate", "w_up", "w_down"):
        return _make(spec, seed, name).to(device=device, dtype=dtype)
    parts = []
    for e in range(spec.model.num_experts):
        t = _make(spec, seed, name, e)
        if cols is not None:
            t = t[:, cols[0]:cols[1]] if name != "w_down" else t[cols[0]:cols[1], :]
        parts.append(t.to(device=device, dtype=dtype))
    return torch.stack(parts).contiguous()


# ---- the reference forward ------------------------------------------------------------
def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def route(u: torch.Tensor, router: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts (fp32), top-k, renormalised: (ids int32 [T,k], weights fp32 [T,k])."""
    probs = torch.softmax((u @ router).float(), dim=-1)
    w, ids = torch.topk(probs, k, dim=-1)
    return ids.to(torch.int32), w / w.sum(-1, keepdim=True)


def reference_forward(spec: DeploymentSpec, w: dict[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V] for ids [B, S] on one device, one expert at a time."""
    m = spec.model
    x = w["embed"][ids.reshape(-1)]
    u = rmsnorm(x, w["norm_in"], m.norm_eps)
    top_ids, top_w = route(u, w["router"], m.top_k)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(m.num_experts):
        tok, slot = (top_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        ue = u[tok]
        a = torch.nn.functional.silu(ue @ w["w_gate"][e]) * (ue @ w["w_up"][e])
        y.index_add_(0, tok, (a @ w["w_down"][e]).float() * top_w[tok, slot, None])
    h = x + y.to(x.dtype)
    logits = rmsnorm(h, w["norm_out"], m.norm_eps) @ w["out"]
    return logits.reshape(*ids.shape, m.vocab_size)


def make_tokens(spec: DeploymentSpec, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu")
    g.manual_seed(seed + 7919)
    return torch.randint(0, spec.model.vocab_size, (spec.model.batch_size, spec.model.seq_len),
                         generator=g, dtype=torch.int64)
