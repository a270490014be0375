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
