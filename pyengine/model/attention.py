"""One layer's attention on one micro-batch, over the KV cache (torch; SDPA on every device).

    a = rmsnorm(x) * attn_norm;  q, k, v = a @ wq (+bq), a @ wk (+bk), a @ wv (+bv)
    q, k normed (qk_norm: per_head over each head's d, or full over the whole projection)
    q, k rotated (RoPE, rotate-half, position = index in the sequence); k, v written to the cache
    o = softmax(q k^T / sqrt(d), causal over the sequence's cached keys) v  (GQA)
    x + o @ wo (+bo)

Each sequence segment of the chunk attends only to its own sequence's keys: a prefill chunk
reads the keys of its sequence's earlier chunks and its own (causal, lower-right aligned); a
decode group (one token per sequence) is one batched call with a key-length mask. On CUDA,
scaled_dot_product_attention picks the flash / memory-efficient kernels.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from pyengine.model.batch import Chunk
from pyengine.model.kv_cache import KVCache
from pyengine.model.math import rmsnorm

def rope_tables(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin [t, d] for the rotate-half convention, computed in fp32, returned in `dtype`."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    freqs = positions.to(torch.float32)[:, None] * inv[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [t, heads, d] rotated by the tables [t, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def _linear(a: torch.Tensor, w: Mapping[str, torch.Tensor], name: str, bias: str) -> torch.Tensor:
    out = a @ w[name]
    return out + w[bias] if bias in w else out


@dataclass(frozen=True, slots=True)
class ChunkTables:
    """What every layer's attention needs for one chunk and reuses: the RoPE tables of its
    positions and, for a decode group, the key-length mask. Made once per forward, on the
    device, from the positions tensor (no host sync)."""

    cos: torch.Tensor
    sin: torch.Tensor
    group_mask: torch.Tensor | None
    """[g, 1, 1, n] True where key j is inside sequence i (decode groups only)."""


def chunk_tables(model, chunk: Chunk, positions: torch.Tensor, dtype: torch.dtype) -> ChunkTables:
    """`positions` [t]: the chunk's token positions, on the device."""
    cos, sin = rope_tables(positions, model.head_size, model.rope_theta, dtype)
    mask = None
    if _is_group(chunk):
        n = max(s.keys for s in chunk.segments)
        mask = (torch.arange(n, device=positions.device)[None, :] <= positions[:, None])[:, None, None, :]
    return ChunkTables(cos, sin, mask)


def _is_group(chunk: Chunk) -> bool:
    return all(s.tokens == 1 for s in chunk.segments) and len(chunk.segments) > 1


def project_qkv(model, w: Mapping[str, torch.Tensor], a: torch.Tensor, tables: ChunkTables):
    """q [t, heads, d], k and v [t, kv_heads, d] of normed rows a [t, H], normed and rotated."""
    eps, d = model.norm_eps, model.head_size
    q, k, v = _linear(a, w, "wq", "bq"), _linear(a, w, "wk", "bk"), _linear(a, w, "wv", "bv")
    if model.qk_norm == "full":
        q, k = rmsnorm(q, w["q_norm"], eps), rmsnorm(k, w["k_norm"], eps)
    t = a.shape[0]
    q, k, v = q.view(t, model.heads, d), k.view(t, model.kv_heads, d), v.view(t, model.kv_heads, d)
    if model.qk_norm == "per_head":
        q, k = rmsnorm(q, w["q_norm"], eps), rmsnorm(k, w["k_norm"], eps)
    return _rotate(q, tables.cos, tables.sin), _rotate(k, tables.cos, tables.sin), v


def attend(cache: KVCache, layer: int, chunk: Chunk, q: torch.Tensor, k: torch.Tensor,
           v: torch.Tensor, tables: ChunkTables) -> torch.Tensor:
    """Write the chunk's k, v to the cache and return the attention output [t, heads * d]."""
    lo = chunk.lo
    for seg in chunk.segments:
        rows = slice(seg.lo - lo, seg.hi - lo)
        cache.write(layer, seg, k[rows], v[rows])
    t, heads, d = q.shape
    if tables.group_mask is not None:  # decode: one batched call over the group
        n = tables.group_mask.shape[-1]
        ks, vs = cache.group(layer, chunk.sequences, n)  # [g, kv, n, d]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), ks, vs, attn_mask=tables.group_mask,
                                           enable_gqa=True)
        return o[:, :, 0, :].reshape(t, heads * d)
    out = torch.empty_like(q)
    for seg in chunk.segments:
        rows = slice(seg.lo - lo, seg.hi - lo)
        ks, vs = cache.keys(layer, seg.seq, seg.keys)
        qs = q[rows].transpose(0, 1).unsqueeze(0)  # [1, heads, t_seg, d]
        mask = causal_lower_right(seg.tokens, seg.keys) if seg.pos and seg.tokens > 1 else None
        o = F.scaled_dot_product_attention(qs, ks.unsqueeze(0), vs.unsqueeze(0), attn_mask=mask,
                                           is_causal=seg.pos == 0 and seg.tokens > 1, enable_gqa=True)
        out[rows] = o[0].transpose(0, 1)
    return out.reshape(t, heads * d)


def attention_block(model, w: Mapping[str, torch.Tensor], x: torch.Tensor, cache: KVCache,
                    layer: int, chunk: Chunk, tables: ChunkTables, a: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """x + attention(x): the residual stream after layer `layer`'s attention. `a`, when given,
    is rmsnorm(x) * attn_norm already computed (fused with the residual add that made x)."""
    if a is None:
        a = rmsnorm(x, w["attn_norm"], model.norm_eps)
    q, k, v = project_qkv(model, w, a, tables)
    o = attend(cache, layer, chunk, q, k, v, tables)
    return x + _linear(o, w, "wo", "bo")
