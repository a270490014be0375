"""The single-device reference behind `pyengine run`'s output check, written independently of the
stage code it checks: its own norm, softmax, top-k and a plain loop over whole experts.

Nothing here calls pyengine.model.math or the stages, so a bug in those shows up as a
mismatch instead of cancelling out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from pyengine.core.spec import DeploymentSpec


def _norm(t: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    tf = t.to(torch.float32)
    scale = 1.0 / torch.sqrt((tf * tf).sum(-1, keepdim=True) / tf.shape[-1] + eps)
    return (tf * scale * gain.to(torch.float32)).to(t.dtype)


def _top_k(logits: torch.Tensor, k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax in fp32 by hand, then the k largest by a full sort, renormalised to sum to 1 when
    `renormalize` (else the raw probabilities of the chosen experts)."""
    z = logits.to(torch.float32)
    e = torch.exp(z - z.max(dim=-1, keepdim=True).values)
    probs = e / e.sum(dim=-1, keepdim=True)
    sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
    w = sorted_p[:, :k]
    return order[:, :k], (w / w.sum(dim=-1, keepdim=True) if renormalize else w)


def reference_forward(spec: DeploymentSpec, w: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V] for ids [B, S] with the full weights, one whole expert at a time."""
    m = spec.model
    x = w["embed"][ids.reshape(-1)]
    u = _norm(x, w["norm_in"], m.norm_eps)
    top_ids, top_w = _top_k(u @ w["router"], m.top_k, m.renormalize)
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(m.num_experts):
        tok, slot = torch.where(top_ids == e)
        if tok.numel() == 0:
            continue
        ue = u[tok]
        gate, up = ue @ w["w_gate"][e], ue @ w["w_up"][e]
        act = gate * torch.sigmoid(gate) * up
        y[tok] += (act @ w["w_down"][e]).to(torch.float32) * top_w[tok, slot].unsqueeze(1)
    h = x + y.to(x.dtype)
    return (_norm(h, w["norm_out"], m.norm_eps) @ w["out"]).reshape(*ids.shape, m.vocab_size)
