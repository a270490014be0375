"""gpt-oss's numerical pieces in torch: attention with sinks and a sliding window, and the
expert's clamped SwiGLU over the interleaved gate/up layout. Not yet wired into the stages;
tests check them against transformers' gpt_oss modules.
"""

from __future__ import annotations

import torch


def sink_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor,
                   scale: float, window: int | None = None) -> torch.Tensor:
    """Causal attention, q [Hq, T, D], k/v [Hkv, T, D], sinks [Hq]: each head's sink logit joins
    the softmax denominator only (it has no value). `window`: a query sees its last `window` keys."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    s = (q.float() @ k.float().transpose(1, 2)) * scale
    t = q.shape[1]
    i = torch.arange(t).unsqueeze(1)
    j = torch.arange(t).unsqueeze(0)
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    s = s.masked_fill(~allowed, float("-inf"))
    sink = sinks.float().view(-1, 1, 1).expand(-1, t, 1)
    p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    return (p @ v.float()).to(q.dtype)


def clamped_swiglu(gate_up: torch.Tensor, alpha: float = 1.702, limit: float = 7.0) -> torch.Tensor:
    """gate_up [..., 2F] with gate in even and up in odd columns -> [..., F]:
    (clamp(up, ±limit) + 1) * g * sigmoid(alpha * g), g = min(gate, limit)."""
    g = gate_up[..., 0::2].clamp(max=limit)
    u = gate_up[..., 1::2].clamp(min=-limit, max=limit)
    return (u + 1) * (g * torch.sigmoid(g * alpha))
