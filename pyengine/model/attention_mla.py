"""Multi-head latent attention (MLA: DeepSeek-V2/V3, Moonlight, Kimi-K2) over the paged KV cache.

Per token (a = the normed rows; engine layout [in, out]; widths from MLASpec):

    q = rmsnorm(a @ wq_a) * q_a_norm @ wq_b      (q_lora_rank set; else a @ wq)   [heads, nope + rope]
    c, k_pe = split(a @ wkv_a, [kv_lora, rope]);  c = rmsnorm(c) * kv_a_norm
    q_pe, k_pe rotated (RoPE of width rope; k_pe is one key shared by every head)
    cache <- [c | k_pe]                           (kv_lora + rope values per token and layer)
    k_nope, v = split(c @ wkv_b, per head [nope, v])
    o = softmax((q_nope . k_nope + q_pe . k_pe) * scale, causal) v;  x + o @ wo

A prefill decompresses the cached latents of its sequence (c @ wkv_b) and runs plain causal
attention. A decode group uses the absorbed form and reads the latent in place: wkv_b's key part
W_UK is folded into q (q_lat = q_nope W_UK^T, per head, width kv_lora), so the scores are
q_lat . c + q_pe . k_pe over the cached rows and the output is (p c) W_UV: the cache is one
single-head "key" [c | k_pe] whose first kv_lora values are also the "value". The Triton path
computes that with kernels/decode_attention_mla.py; the torch path with SDPA over the gathered rows.

The two latent norms use eps 1e-6 whatever rms_norm_eps says (transformers' and DeepSeek's own
code build them with the RMSNorm default). DeepSeek checkpoints lay each rotary slice out in
interleaved pairs (rope_interleave); the loader permutes those columns once (`deinterleave_rope`)
so the rotate-half tables of the engine apply: q and k are permuted alike, so q . k is unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from pyengine.model.kv_cache import blocks_for
from pyengine.model.math import rmsnorm

LATENT_NORM_EPS = 1e-6


def softmax_scale(model) -> float:
    from pyengine.model.rope_yarn import softmax_scale as scale

    return scale(model.mla.qk_head_dim, model.rope_scaling)


def deinterleave_rope(w: torch.Tensor, groups: int, nope: int, rope: int) -> torch.Tensor:
    """w [in, groups * (nope + rope)] (engine layout) with each group's last `rope` columns in
    interleaved pairs (x0, x1), (x2, x3), ... -> those columns as (x0, x2, ..., x1, x3, ...)."""
    order = torch.arange(w.shape[-1]).view(groups, nope + rope)
    tail = order[:, nope:]
    order = torch.cat([order[:, :nope], tail[:, 0::2], tail[:, 1::2]], dim=1).reshape(-1)
    return w[..., order].contiguous()


# ---- the parts --------------------------------------------------------------------------------------
def project_q(model, w: Mapping[str, torch.Tensor], a: torch.Tensor, norm=rmsnorm) -> torch.Tensor:
    """q [t, heads, nope + rope] (not rotated). `norm(x, w, eps)`: the RMSNorm to use (the Triton
    path's fused kernel, or plain torch)."""
    m = model.mla
    if m.q_lora_rank is None:
        q = a @ w["wq"]
    else:
        q = norm(a @ w["wq_a"], w["q_a_norm"], LATENT_NORM_EPS) @ w["wq_b"]
    return q.view(a.shape[0], model.heads, m.qk_head_dim)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [t, heads, r] rotated (rotate-half) by the tables [t, r]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def latent(model, w: Mapping[str, torch.Tensor], a: torch.Tensor, cos, sin, norm=rmsnorm) -> torch.Tensor:
    """The cache rows [t, 1, kv_lora + rope]: the normed latent and the rotated shared key."""
    m = model.mla
    c, k_pe = (a @ w["wkv_a"]).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
    c = norm(c.contiguous(), w["kv_a_norm"], LATENT_NORM_EPS)
    return torch.cat([c, rotate(k_pe[:, None, :], cos, sin)[:, 0]], dim=-1)[:, None, :]


def absorb_q(model, w: Mapping[str, torch.Tensor], q: torch.Tensor) -> torch.Tensor:
    """q [t, heads, nope + rope] -> [t, heads, kv_lora + rope]: q_nope through W_UK, q_pe as is."""
    m = model.mla
    w_uk = w["wkv_b"].view(m.kv_lora_rank, model.heads, -1)[..., :m.qk_nope_head_dim]  # [c, heads, nope]
    q_lat = torch.einsum("thn,chn->thc", q[..., :m.qk_nope_head_dim], w_uk)
    return torch.cat([q_lat, q[..., m.qk_nope_head_dim:]], dim=-1)


def unabsorb_out(model, w: Mapping[str, torch.Tensor], o_lat: torch.Tensor) -> torch.Tensor:
    """Latent-space outputs [t, heads, kv_lora] -> [t, heads * v] through W_UV."""
    m = model.mla
    w_uv = w["wkv_b"].view(m.kv_lora_rank, model.heads, -1)[..., m.qk_nope_head_dim:]  # [c, heads, v]
    return torch.einsum("thc,chv->thv", o_lat, w_uv).reshape(o_lat.shape[0], -1)


def decompress(model, w: Mapping[str, torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached rows [n, kv_lora + rope] -> k [heads, n, nope + rope], v [heads, n, v]."""
    m, n = model.mla, rows.shape[0]
    kv = (rows[:, :m.kv_lora_rank] @ w["wkv_b"]).view(n, model.heads, -1).transpose(0, 1)
    k_nope, v = kv.split([m.qk_nope_head_dim, m.v_head_dim], dim=-1)
    k_pe = rows[None, :, m.kv_lora_rank:].expand(model.heads, n, m.qk_rope_head_dim)
    return torch.cat([k_nope, k_pe], dim=-1), v


# ---- the torch path ---------------------------------------------------------------------------------
def mla_prepare(model, w, a: torch.Tensor, cache, layer: int, tables, norm=rmsnorm) -> torch.Tensor:
    """q rotated [t, heads, nope + rope]; the latent rows written to the cache."""
    nope = model.mla.qk_nope_head_dim
    q = project_q(model, w, a, norm)
    q = torch.cat([q[..., :nope], rotate(q[..., nope:], tables.cos, tables.sin)], dim=-1)
    cache.write(layer, tables.rows, latent(model, w, a, tables.cos, tables.sin, norm), None)
    return q


def mla_attend_decode(model, w, cache, layer: int, q: torch.Tensor, tables) -> torch.Tensor:
    """Absorbed: q [g, heads, nope + rope] over each row's cached latents (gathered) -> [g, heads * v]."""
    kv_lora = model.mla.kv_lora_rank
    slots = torch.where(tables.slots < 0, cache.padding_slot, tables.slots)
    rows, _ = cache.gather(layer, slots, tables.key_blocks)  # [g, 1, n, kv_lora + rope]
    o = F.scaled_dot_product_attention(absorb_q(model, w, q).unsqueeze(2), rows, rows[..., :kv_lora],
                                       attn_mask=tables.mask, scale=softmax_scale(model), enable_gqa=True)
    return unabsorb_out(model, w, o[:, :, 0, :])


def mla_attend_prefill(model, w, cache, layer: int, chunk, q: torch.Tensor, tables) -> torch.Tensor:
    """Each segment over its sequence's decompressed latents (earlier chunks and its own), causal."""
    from torch.nn.attention.bias import causal_lower_right

    out = q.new_empty(q.shape[0], model.heads, model.mla.v_head_dim)
    lo, scale = chunk.lo, softmax_scale(model)
    for seg in chunk.segments:
        r = seg.lo - lo
        rows, _ = cache.gather(layer, tables.slots[r:r + 1], blocks_for(seg.keys, cache.block_size))
        k, v = decompress(model, w, rows[0, 0, :seg.keys])
        qs = q[r:r + seg.tokens].transpose(0, 1)  # [heads, t_seg, nope + rope]
        mask = causal_lower_right(seg.tokens, seg.keys) if seg.pos and seg.tokens > 1 else None
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, scale=scale,
                                           is_causal=seg.pos == 0 and seg.tokens > 1)
        out[r:r + seg.tokens] = o.transpose(0, 1)
    return out.reshape(q.shape[0], -1)


def mla_attention_torch(model, w: Mapping[str, torch.Tensor], a: torch.Tensor, cache, layer: int, chunk,
                        tables) -> torch.Tensor:
    """The attention output [t, heads * v] of normed rows a [t, H]; the latent written to the cache."""
    q = mla_prepare(model, w, a, cache, layer, tables)
    if tables.decode:
        return mla_attend_decode(model, w, cache, layer, q, tables)
    return mla_attend_prefill(model, w, cache, layer, chunk, q, tables)
