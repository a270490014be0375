"""References for the tests, written from the math the obvious way, in float64, plain torch.

Nothing here imports pyengine (tests/model/test_reference.py checks it): a bug in the product's
helpers (pyengine.model.math, the stages, pyengine.model.reference) cannot cancel out against
these. Weights are plain tensors under the names of pyengine.model.weights (embed [V, H],
norm_in [H], router [H, E], w_gate / w_up [E, H, F], w_down [E, F, H], norm_out [H], out [H, V]).
"""

from __future__ import annotations

import math

import torch


def rmsnorm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """Each row divided by the square root of (its mean square + eps), times the gain."""
    x = x.double()
    mean_square = (x * x).sum(-1, keepdim=True) / x.shape[-1]
    return x / torch.sqrt(mean_square + eps) * gain.double()


def softmax_top_k(logits: torch.Tensor, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Per row: the k most probable experts (ties: the lower id) and their probabilities
    renormalised over those k. Python floats, one row at a time."""
    ids, weights = [], []
    for row in logits.double().tolist():
        top = max(row)
        exps = [math.exp(v - top) for v in row]
        total = sum(exps)
        probs = [e / total for e in exps]
        chosen = sorted(range(len(row)), key=lambda e: (-probs[e], e))[:k]
        kept = sum(probs[e] for e in chosen)
        ids.append(chosen)
        weights.append([probs[e] / kept for e in chosen])
    return ids, weights


def silu(v: torch.Tensor) -> torch.Tensor:
    return v / (1.0 + torch.exp(-v))


def moe_block(w: dict, ids: torch.Tensor, top_k: int, eps: float) -> torch.Tensor:
    """logits [T, V] (float64) of the whole block for token ids [T] (or [B, S], flattened):
    x = embed[ids]; u = rmsnorm(x); route u; y = sum over the chosen experts of
    weight * (silu(u W_gate) * (u W_up)) W_down, every F column; logits = rmsnorm(x + y) @ out.
    One token at a time, one chosen expert at a time."""
    d = {name: t.double() for name, t in w.items()}
    x = d["embed"][ids.reshape(-1)]
    u = rmsnorm(x, d["norm_in"], eps)
    chosen, gates = softmax_top_k(u @ d["router"], top_k)
    y = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for e, g in zip(chosen[t], gates[t]):
            act = silu(u[t] @ d["w_gate"][e]) * (u[t] @ d["w_up"][e])
            y[t] += g * (act @ d["w_down"][e])
    return rmsnorm(x + y, d["norm_out"], eps) @ d["out"]


def rope(x: torch.Tensor, positions: list[int], theta: float) -> torch.Tensor:
    """x [S, heads, d]: dimension i and i + d/2 of the token at position p rotated by the angle
    p * theta^(-2i/d) (the rotate-half convention), as a 2x2 rotation of each pair."""
    d = x.shape[-1]
    pos = torch.tensor(positions, dtype=torch.float64)[:, None, None]
    angle = pos * theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    lo, hi = x[..., : d // 2].double(), x[..., d // 2:].double()
    return torch.cat([lo * angle.cos() - hi * angle.sin(), hi * angle.cos() + lo * angle.sin()], dim=-1)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [S, heads, d], k and v [S, kv, d]: query head h reads kv head h // (heads / kv); token s
    attends to tokens 0..s: softmax(q.k / sqrt(d)) over them, one head at a time. [S, heads * d]."""
    s_len, heads, d = q.shape
    group = heads // k.shape[1]
    future = torch.ones(s_len, s_len).triu(1).bool()
    out = []
    for h in range(heads):
        scores = (q[:, h].double() @ k[:, h // group].double().T) / math.sqrt(d)
        out.append(torch.softmax(scores.masked_fill(future, -math.inf), dim=-1) @ v[:, h // group].double())
    return torch.stack(out, dim=1).reshape(s_len, heads * d)


def decoder_model(w: dict, ids: torch.Tensor, *, layers: int, heads: int, kv: int, top_k: int,
                  eps: float, theta: float, qk_norm: str = "none") -> torch.Tensor:
    """logits [B*S, V] (float64) of a model of decoder layers for ids [B, S]: per layer and
    sequence, x += o(attention(rmsnorm(x))) with q/k normed (per head over d, or over the whole
    projection) and rotated; then x += the routed experts of rmsnorm(x); finally the head.
    Per-layer weights are named layers.<l>.<name>; everything else as in moe_block."""
    d = {name: t.double() for name, t in w.items()}
    b, s = ids.shape
    x = d["embed"][ids.reshape(-1)]
    for layer in range(layers):
        p = f"layers.{layer}."
        rows = []
        for seq in range(b):
            xs = x[seq * s:(seq + 1) * s]
            a = rmsnorm(xs, d[p + "attn_norm"], eps)
            q, k, v = a @ d[p + "wq"], a @ d[p + "wk"], a @ d[p + "wv"]
            if qk_norm == "full":
                q, k = rmsnorm(q, d[p + "q_norm"], eps), rmsnorm(k, d[p + "k_norm"], eps)
            q, k, v = q.reshape(s, heads, -1), k.reshape(s, kv, -1), v.reshape(s, kv, -1)
            if qk_norm == "per_head":
                q, k = rmsnorm(q, d[p + "q_norm"], eps), rmsnorm(k, d[p + "k_norm"], eps)
            q, k = rope(q, list(range(s)), theta), rope(k, list(range(s)), theta)
            rows.append(xs + causal_attention(q, k, v) @ d[p + "wo"])
        x = torch.cat(rows)
        u = rmsnorm(x, d[p + "norm_in"], eps)
        chosen, gates = softmax_top_k(u @ d[p + "router"], top_k)
        y = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for e, g in zip(chosen[t], gates[t]):
                act = silu(u[t] @ d[p + "w_gate"][e]) * (u[t] @ d[p + "w_up"][e])
                y[t] += g * (act @ d[p + "w_down"][e])
        x = x + y
    return rmsnorm(x, d["norm_out"], eps) @ d["out"]
