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


def _grouped_top_k(m, logits: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores; the choice by score + bias within the best groups (each ranked by its two best
    biased scores, ties to the lower group); weights the chosen plain scores, renormalised (+1e-20)
    when `renormalize`, times the scaling factor. One row at a time."""
    g = m.grouped_routing
    s = 1.0 / (1.0 + torch.exp(-logits.to(torch.float32)))
    c = s + bias.to(torch.float32)
    size = m.num_experts // g.n_group
    ids = torch.empty(s.shape[0], m.top_k, dtype=torch.long)
    for row in range(s.shape[0]):
        score = [sum(sorted(c[row, i * size:(i + 1) * size].tolist(), reverse=True)[:2]) for i in range(g.n_group)]
        groups = sorted(range(g.n_group), key=lambda i: (-score[i], i))[:g.topk_group]
        allowed = [e for e in range(m.num_experts) if e // size in groups]
        ids[row] = torch.tensor(sorted(allowed, key=lambda e: (-c[row, e].item(), e))[:m.top_k])
    w = torch.gather(s, 1, ids.to(s.device))
    if m.renormalize:
        w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
    return ids.to(s.device), w * g.routed_scaling_factor


def _mlp(w: Mapping[str, torch.Tensor], name: str, u: torch.Tensor) -> torch.Tensor:
    """A dense SwiGLU MLP (tensors name_gate, name_up, name_down) of every row, fp32 [T, H]."""
    gate = u @ w[name + "_gate"]
    return ((gate * torch.sigmoid(gate) * (u @ w[name + "_up"])) @ w[name + "_down"]).to(torch.float32)


def _moe(m, w: Mapping[str, torch.Tensor], prefix: str, u: torch.Tensor) -> torch.Tensor:
    """The routed experts' weighted sum [T, H] (fp32) of normed rows u, one whole expert at a time."""
    if m.grouped_routing is not None:
        top_ids, top_w = _grouped_top_k(m, u.float() @ w[prefix + "router"].float(), w[prefix + "router_correction"])
    else:
        logits = u @ w[prefix + "router"]
        top_ids, top_w = _top_k(logits + w[prefix + "router_bias"] if m.router_bias else logits, m.top_k,
                                m.renormalize)
    y = torch.zeros(u.shape, dtype=torch.float32, device=u.device)
    if m.shared_expert_size:  # the always-on expert, every token: weight 1, or its own sigmoid gate
        shared = _mlp(w, prefix + "ws", u)
        if m.shared_expert_gate:
            shared = shared / (1.0 + torch.exp(-(u @ w[prefix + "ws_scale"]).to(torch.float32)))
        y += shared
    for e in range(m.num_experts):
        tok, slot = torch.where(top_ids == e)
        if tok.numel() == 0:
            continue
        ue = u[tok]
        gate, up = ue @ w[prefix + "w_gate"][e], ue @ w[prefix + "w_up"][e]
        if m.expert_bias:
            gate, up = gate + w[prefix + "b_gate"][e], up + w[prefix + "b_up"][e]
        if m.clamped_swiglu is not None:  # gpt-oss: gate clamped above, up both sides, up + 1
            c = m.clamped_swiglu
            gate, up = torch.minimum(gate, torch.tensor(c.limit)), torch.clip(up, -c.limit, c.limit) + 1
            act = gate / (1 + torch.exp(-c.alpha * gate)) * up
        else:
            act = gate * torch.sigmoid(gate) * up
        down = act @ w[prefix + "w_down"][e]
        if m.expert_bias:
            down = down + w[prefix + "b_down"][e]
        y[tok] += down.to(torch.float32) * top_w[tok, slot].unsqueeze(1)
    return y


def _rope(t: torch.Tensor, theta: float) -> torch.Tensor:
    """t [heads, S, d] rotated as complex pairs (t_i, t_{i+d/2}) by angle p * theta^(-2i/d)."""
    s, d = t.shape[1], t.shape[2]
    angle = torch.outer(torch.arange(s, dtype=torch.float64),
                        theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d))
    z = torch.complex(t[..., : d // 2].double(), t[..., d // 2:].double()) * torch.polar(
        torch.ones_like(angle), angle).to(t.device)
    return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)


def _attention(m, w: Mapping[str, torch.Tensor], layer: int, x: torch.Tensor) -> torch.Tensor:
    prefix = f"layers.{layer}."
    if m.mla is not None:
        from pyengine.model.reference_mla import mla_attention

        return mla_attention(m, w, prefix, x, _norm)
    return _gqa_attention(m, w, layer, x)


def _gqa_attention(m, w: Mapping[str, torch.Tensor], layer: int, x: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of one sequence x [S, H]: explicit scores, a triangular mask (a band with
    a sliding window), fp32 softmax (with a sink logit per head when the model has them)."""
    prefix = f"layers.{layer}."
    d, heads, kv = m.head_size, m.heads, m.kv_heads
    a = _norm(x, w[prefix + "attn_norm"], m.norm_eps)
    q, k, v = (a @ w[prefix + "w" + p] + (w[prefix + "b" + p] if p in m.biased else 0) for p in "qkv")
    if m.qk_norm == "full":
        q, k = _norm(q, w[prefix + "q_norm"], m.norm_eps), _norm(k, w[prefix + "k_norm"], m.norm_eps)
    s = x.shape[0]
    q, k, v = (t.reshape(s, n, d).transpose(0, 1) for t, n in ((q, heads), (k, kv), (v, kv)))
    if m.qk_norm == "per_head":
        q, k = _norm(q, w[prefix + "q_norm"], m.norm_eps), _norm(k, w[prefix + "k_norm"], m.norm_eps)
    if m.rope_scaling is not None:  # YaRN (gpt-oss): the MLA reference's frequencies and cos/sin factor
        from pyengine.model.reference_mla import angles, rotate

        angle, factor, _ = angles(m, s, d, d)
        q, k = rotate(q, angle, factor), rotate(k, angle, factor)
    else:
        q, k = _rope(q, m.rope_theta), _rope(k, m.rope_theta)
    group = heads // kv
    out = torch.empty(heads, s, d, dtype=x.dtype, device=x.device)
    hidden = torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=1)  # the future
    if m.window(layer):  # and keys more than window - 1 before the query
        hidden |= torch.tril(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=-m.window(layer))
    for h in range(heads):
        scores = ((q[h].float() @ k[h // group].float().T) / d**0.5).masked_fill(hidden, float("-inf"))
        if m.attention_sinks:  # an extra logit in each row's denominator, with no value
            top = torch.maximum(scores.max(-1, keepdim=True).values, w[prefix + "sinks"][h].float())
            e = torch.exp(scores - top)
            probs = e / (e.sum(-1, keepdim=True) + torch.exp(w[prefix + "sinks"][h].float() - top))
        else:
            probs = torch.softmax(scores, dim=-1)
        out[h] = (probs @ v[h // group].float()).to(x.dtype)
    o = out.transpose(0, 1).reshape(s, heads * d) @ w[prefix + "wo"]
    return o + w[prefix + "bo"] if "o" in m.biased else o


def reference_forward(spec: DeploymentSpec, w: Mapping[str, torch.Tensor], ids: torch.Tensor) -> torch.Tensor:
    """logits [B, S, V] for ids [B, S] with the full weights: every layer's attention per sequence
    (no cache, no chunks), then its experts one whole expert at a time."""
    m = spec.model
    x = w["embed"][ids.reshape(-1)]
    if not m.layered:
        y = _moe(m, w, "", _norm(x, w["norm_in"], m.norm_eps))
    else:
        b, s = ids.shape
        for layer in range(m.layers):
            p = f"layers.{layer}."
            x = torch.cat([xs + _attention(m, w, layer, xs) for xs in x.reshape(b, s, -1)])
            u = _norm(x, w[p + "norm_in"], m.norm_eps)
            y = _mlp(w, p + "wd", u) if m.is_dense(layer) else _moe(m, w, p, u)
            if layer + 1 < m.layers:
                x = x + y.to(x.dtype)
    h = x + y.to(x.dtype)
    return (_norm(h, w["norm_out"], m.norm_eps) @ w["out"]).reshape(*ids.shape, m.vocab_size)
