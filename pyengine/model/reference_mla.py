"""The output-check reference's multi-head latent attention (pyengine.model.reference), written
independently of pyengine.model.attention_mla and rope_yarn: every key and value decompressed for
every head (no absorption, no cache), YaRN's frequencies and scales from the formulas, RoPE as
complex pairs, explicit scores with a triangular mask, fp32 softmax. One sequence x [S, H]."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch


def _m(scale: float, c: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * c * math.log(scale) + 1.0


def angles(m, s: int, r: int | None = None, head_dim: int | None = None) -> tuple[torch.Tensor, float, float]:
    """(angles [S, r/2] float64, the cos/sin factor, the softmax scale) of rotary width r (MLA's
    qk_rope_head_dim by default) and q/k width head_dim (MLA's qk_head_dim)."""
    r, theta, y = r or m.mla.qk_rope_head_dim, m.rope_theta, m.rope_scaling
    freq = theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    factor, scale = 1.0, (head_dim or m.mla.qk_head_dim) ** -0.5
    if y is not None:
        def dim_of(rot):
            return r * math.log(y.original_max_positions / (rot * 2 * math.pi)) / (2 * math.log(theta))
        lo, hi = dim_of(y.beta_fast), dim_of(y.beta_slow)
        lo, hi = (math.floor(lo), math.ceil(hi)) if y.truncate else (lo, hi)
        lo, hi = max(lo, 0), min(hi, r - 1)
        ramp = ((torch.arange(r // 2, dtype=torch.float64) - lo) / ((hi - lo) or 0.001)).clamp(0, 1)
        freq = freq / y.factor * ramp + freq * (1 - ramp)
        if y.attention_factor:
            factor = y.attention_factor
        elif y.mscale and y.mscale_all_dim:
            factor = _m(y.factor, y.mscale) / _m(y.factor, y.mscale_all_dim)
        else:
            factor = _m(y.factor, 1.0)
        if y.mscale_all_dim:
            scale *= _m(y.factor, y.mscale_all_dim) ** 2
    return torch.outer(torch.arange(s, dtype=torch.float64), freq), factor, scale


def rotate(t: torch.Tensor, angle: torch.Tensor, factor: float) -> torch.Tensor:
    """t [..., S, r]: pairs (t_i, t_{i+r/2}) as complex numbers times factor * e^(i angle)."""
    r = t.shape[-1]
    z = torch.complex(t[..., : r // 2].double(), t[..., r // 2:].double()) * torch.polar(
        torch.full_like(angle, factor), angle).to(t.device)
    return torch.cat([z.real, z.imag], dim=-1).to(t.dtype)


def mla_attention(m, w: Mapping[str, torch.Tensor], prefix: str, x: torch.Tensor, norm: Callable) -> torch.Tensor:
    mla, heads, s = m.mla, m.heads, x.shape[0]
    nope, rope, c_w = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.kv_lora_rank
    a = norm(x, w[prefix + "attn_norm"], m.norm_eps)
    if mla.q_lora_rank is not None:
        q = norm(a @ w[prefix + "wq_a"], w[prefix + "q_a_norm"], 1e-6) @ w[prefix + "wq_b"]
    else:
        q = a @ w[prefix + "wq"]
    q = q.reshape(s, heads, nope + rope).transpose(0, 1)  # [heads, S, nope + rope]
    ckv = a @ w[prefix + "wkv_a"]
    c = norm(ckv[:, :c_w], w[prefix + "kv_a_norm"], 1e-6)
    kv = (c @ w[prefix + "wkv_b"]).reshape(s, heads, nope + mla.v_head_dim).transpose(0, 1)
    angle, factor, scale = angles(m, s)
    q_pe, k_pe = rotate(q[..., nope:], angle, factor), rotate(ckv[:, c_w:], angle, factor)
    future = torch.triu(torch.ones(s, s, dtype=torch.bool, device=x.device), diagonal=1)
    out = torch.empty(heads, s, mla.v_head_dim, dtype=x.dtype, device=x.device)
    for h in range(heads):
        scores = (q[h, :, :nope].float() @ kv[h, :, :nope].float().T + q_pe[h].float() @ k_pe.float().T) * scale
        probs = torch.softmax(scores.masked_fill(future, float("-inf")), dim=-1)
        out[h] = (probs @ kv[h, :, nope:].float()).to(x.dtype)
    return out.transpose(0, 1).reshape(s, -1) @ w[prefix + "wo"]
