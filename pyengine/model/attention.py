"""One layer's attention on one micro-batch, over the paged KV cache (the torch path; SDPA).

    a = rmsnorm(x) * attn_norm;  q, k, v = a @ [wq | wk | wv] (+ [bq | bk | bv])  (one GEMM)
    q, k normed (qk_norm: per_head over each head's d, or full over the whole projection)
    q, k rotated (RoPE, rotate-half, position = index in the sequence); k, v written to the cache
    o = softmax(q k^T / sqrt(d), causal over the sequence's cached keys) v  (GQA)
    x + o @ wo (+bo)

Each sequence segment of a chunk attends only to its own sequence's keys: a prefill chunk reads the
keys of its sequence's earlier chunks and its own (causal, lower-right aligned); a decode group (one
token per sequence) is one batched call over its sequences' gathered blocks with a key-length mask,
so its launches do not grow with the number of sequences. What every layer reuses for a chunk (RoPE
rows, cache rows, lengths, the mask) is made once per forward (`ChunkTables`); the RoPE tables once
per cache capacity (`RopeTables`). The Triton path (pyengine.model.ops_triton) replaces the norm +
RoPE + cache write and the decode attention by fused kernels over the same tables.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from pyengine.model.batch import Chunk
from pyengine.model.kv_cache import KVCache, blocks_for
from pyengine.model.math import rmsnorm


@dataclass(frozen=True, slots=True)
class RopeTables:
    """cos, sin of every position up to a capacity, fp32, made once: `half` [P, d/2] (what the fused
    kernel reads) and `full` [P, d] (rotate-half: the half repeated)."""

    cos_half: torch.Tensor
    sin_half: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor

    @classmethod
    def make(cls, positions: int, head_dim: int, theta: float, device, scaling=None) -> RopeTables:
        """`scaling`: a YarnSpec (its frequencies, and cos/sin times its factor) or None."""
        from pyengine.model.rope_yarn import cos_sin_factor, inv_freq

        inv = inv_freq(head_dim, theta, scaling, device)
        freqs = torch.arange(positions, device=device, dtype=torch.float32)[:, None] * inv[None, :]
        cos, sin = freqs.cos(), freqs.sin()
        if scaling is not None:
            factor = cos_sin_factor(scaling)
            cos, sin = cos * factor, sin * factor
        return cls(cos, sin, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))

    @classmethod
    def for_model(cls, model, positions: int, device) -> RopeTables:
        """The tables of a model spec: its rotary width, base and scaling."""
        return cls.make(positions, model.rope_dim, model.rope_theta, device, model.rope_scaling)

    @property
    def capacity(self) -> int:
        return self.cos.shape[0]


@dataclass(frozen=True, slots=True)
class ChunkTables:
    """What every layer's attention reads for one chunk, on the device, made once per forward (a
    static decode step: written in place into persistent buffers)."""

    positions: torch.Tensor
    """[t] int32: each row's position in its sequence."""
    slots: torch.Tensor
    """[t] int32: each row's KV slot; -1 for a padding row."""
    lengths: torch.Tensor
    """[t] int32: keys each row's sequence holds once this chunk is cached (decode attention reads
    that many); 0 for a padding row."""
    rows: torch.Tensor
    """[t] int64: each row's flat cache row (padding rows: the trash block)."""
    cos: torch.Tensor
    sin: torch.Tensor
    """[t, d] in the model dtype."""
    rope: RopeTables
    decode: bool
    """A decode group: one token per row, each row its own sequence."""
    key_blocks: int = 0
    """Blocks the torch path's decode gather reads (the group's longest sequence)."""
    mask: torch.Tensor | None = None
    """[t, 1, 1, key_blocks * block_size] True where key j is inside row i's sequence (decode)."""
    ring_rows: torch.Tensor | None = None
    """[t] int64: each row's flat row in a sliding layer's ring (kv_cache.KVCache.ring_rows); None:
    the cache has no ring."""

    def rows_of(self, cache: KVCache, layer: int) -> torch.Tensor:
        """The rows `layer`'s keys are written to."""
        return self.ring_rows if cache.is_ring(layer) else self.rows


def chunk_tables(cache: KVCache, rope: RopeTables, chunk: Chunk | None, meta: torch.Tensor,
                 dtype: torch.dtype, key_blocks: int = 0) -> ChunkTables:
    """`meta` [3, t] int32 on the device: positions, slots (-1: padding), lengths. `key_blocks` (decode
    groups): blocks of the longest sequence (known on the host). `chunk` None: a static decode
    group (one token per row, padding rows included)."""
    positions, slots, lengths = meta[0], meta[1], meta[2]
    table_rows = torch.where(slots < 0, cache.padding_slot, slots)
    rows = cache.rows(table_rows, positions)
    pos = positions.long()
    cos, sin = rope.cos[pos].to(dtype), rope.sin[pos].to(dtype)
    decode = chunk is None or _is_group(chunk)
    mask = None
    if decode:
        n = key_blocks * cache.block_size
        mask = (torch.arange(n, device=meta.device)[None, :] < lengths.clamp(min=1)[:, None])[:, None, None, :]
    ring_rows = cache.ring_rows(table_rows, positions, lengths)
    return ChunkTables(positions, slots, lengths, rows, cos, sin, rope, decode, key_blocks, mask, ring_rows)


def host_meta(chunk: Chunk, padding: int = 0) -> list[list[int]]:
    """[positions, slots, lengths] of a chunk's rows, then `padding` padding rows."""
    pos, slots, lengths = [], [], []
    for seg in chunk.segments:
        pos += range(seg.pos, seg.pos + seg.tokens)
        slots += [seg.seq] * seg.tokens
        lengths += [seg.keys] * seg.tokens
    return [pos + [0] * padding, slots + [-1] * padding, lengths + [0] * padding]


def key_blocks(chunk: Chunk, block_size: int) -> int:
    return blocks_for(max(s.keys for s in chunk.segments), block_size)


def _is_group(chunk: Chunk) -> bool:
    return all(s.tokens == 1 for s in chunk.segments) and len(chunk.segments) > 1


# ---- the torch path ---------------------------------------------------------------------------------
def linear(a: torch.Tensor, w: Mapping[str, torch.Tensor], name: str, bias: str) -> torch.Tensor:
    return torch.addmm(w[bias], a, w[name]) if bias in w else a @ w[name]


def project_qkv(model, w: Mapping[str, torch.Tensor], a: torch.Tensor) -> torch.Tensor:
    """The fused projection [t, (heads + 2 kv) * d] (bias included): one GEMM."""
    return linear(a, w, "wqkv", "bqkv")


def split_qkv(model, qkv: torch.Tensor):
    d = model.head_size
    q, k, v = qkv.split([model.heads * d, model.kv_heads * d, model.kv_heads * d], dim=-1)
    return q, k, v


def norm_and_rotate(model, w: Mapping[str, torch.Tensor], qkv: torch.Tensor, tables: ChunkTables):
    """q [t, heads, d], k and v [t, kv_heads, d] of the fused projection, normed and rotated."""
    eps, d, t = model.norm_eps, model.head_size, qkv.shape[0]
    q, k, v = split_qkv(model, qkv)
    if model.qk_norm == "full":
        q, k = rmsnorm(q, w["q_norm"], eps), rmsnorm(k, w["k_norm"], eps)
    q, k, v = q.reshape(t, model.heads, d), k.reshape(t, model.kv_heads, d), v.reshape(t, model.kv_heads, d)
    if model.qk_norm == "per_head":
        q, k = rmsnorm(q, w["q_norm"], eps), rmsnorm(k, w["k_norm"], eps)
    return _rotate(q, tables.cos, tables.sin), _rotate(k, tables.cos, tables.sin), v


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [t, heads, d] rotated by the tables [t, d]."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rot * sin[:, None, :]


def attend_decode(cache: KVCache, layer: int, q: torch.Tensor, tables: ChunkTables, window: int = 0,
                  sinks: torch.Tensor | None = None) -> torch.Tensor:
    """A decode group's attention: q [g, heads, d] over each row's cached keys (its last `window`
    with one) -> [g, heads * d]. The gather reads the group's longest sequence; the window masks."""
    slots = torch.where(tables.slots < 0, cache.padding_slot, tables.slots)
    ks, vs = cache.gather(layer, slots, tables.key_blocks)  # [g, kv, n, d]
    mask = tables.mask
    if window:
        first = (tables.lengths.clamp(min=1) - window)[:, None, None, None]
        mask = mask & (torch.arange(ks.shape[2], device=q.device) >= first)
    o = _attend(q.unsqueeze(2), ks, vs, mask, sinks)
    return o[:, :, 0, :].reshape(q.shape[0], -1)


def _attend(q, k, v, mask, sinks, is_causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over the keys `mask` allows (GQA), q [b, heads, tq, d]; with `sinks`
    [heads], each head's sink logit joins the softmax denominator (explicit scores: SDPA has none)."""
    if sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, -1, 1, 1).expand(s.shape[0], -1, s.shape[2], 1)
    p = torch.softmax(torch.cat([s, sink], -1), -1)[..., :-1]
    return (p @ v.float()).to(q.dtype)


def _window_mask(seg, first_key: int, keys: int, window: int, device) -> torch.Tensor:
    """[tokens, keys - first_key] True where the segment's query (position seg.pos + i) sees key
    first_key + j: causal, and within its last `window` keys when window > 0."""
    i = torch.arange(seg.pos, seg.pos + seg.tokens, device=device)[:, None]
    j = torch.arange(first_key, keys, device=device)[None, :]
    ok = j <= i
    return ok & (j > i - window) if window else ok


def attend_prefill(cache: KVCache, layer: int, chunk: Chunk, q: torch.Tensor, tables: ChunkTables,
                   window: int = 0, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """Each segment over its sequence's cached keys (earlier chunks and its own), causal; with a
    `window`, from the first block holding a key its first query sees."""
    out = torch.empty_like(q)
    lo, bs = chunk.lo, cache.block_size
    for seg in chunk.segments:
        r = seg.lo - lo
        first = max(0, seg.pos - window + 1) // bs if window else 0  # blocks before: outside every window
        ks, vs = cache.gather(layer, tables.slots[r:r + 1], blocks_for(seg.keys, bs), first)
        ks, vs = ks[:, :, :seg.keys - first * bs], vs[:, :, :seg.keys - first * bs]
        qs = q[r:r + seg.tokens].transpose(0, 1).unsqueeze(0)  # [1, heads, t_seg, d]
        if window or sinks is not None:
            o = _attend(qs, ks, vs, _window_mask(seg, first * bs, seg.keys, window, q.device), sinks)
        else:
            mask = causal_lower_right(seg.tokens, seg.keys) if seg.pos and seg.tokens > 1 else None
            o = _attend(qs, ks, vs, mask, None, is_causal=seg.pos == 0 and seg.tokens > 1)
        out[r:r + seg.tokens] = o[0].transpose(0, 1)
    return out.reshape(q.shape[0], -1)


def attend_prefill_ring(cache: KVCache, layer: int, chunk: Chunk, q: torch.Tensor, k: torch.Tensor,
                        v: torch.Tensor, tables: ChunkTables, window: int,
                        sinks: torch.Tensor | None = None) -> torch.Tensor:
    """A ring layer's prefill: each segment over the window's keys before it, read from the ring
    before this chunk's keys overwrite them, and its own fresh keys k, v [t, kv_heads, d]; then the
    chunk's keys are written (the last ring's worth of each segment)."""
    lo, bs = chunk.lo, cache.block_size
    before = []
    for seg in chunk.segments:
        first = max(0, seg.pos - window + 1) // bs * bs  # the first block a query of the segment sees
        ks, vs = cache.gather(layer, tables.slots[seg.lo - lo:seg.lo - lo + 1], blocks_for(seg.pos, bs), first // bs)
        before.append((first, ks[:, :, :seg.pos - first], vs[:, :, :seg.pos - first]))
    cache.write(layer, tables.ring_rows, k, v)
    out = torch.empty_like(q)
    for seg, (first, ks, vs) in zip(chunk.segments, before):
        r = seg.lo - lo
        fresh = lambda x: x[r:r + seg.tokens].transpose(0, 1).unsqueeze(0)  # [1, kv, t_seg, d]
        ks, vs = torch.cat([ks, fresh(k)], 2), torch.cat([vs, fresh(v)], 2)
        qs = q[r:r + seg.tokens].transpose(0, 1).unsqueeze(0)
        o = _attend(qs, ks, vs, _window_mask(seg, first, seg.keys, window, q.device), sinks)
        out[r:r + seg.tokens] = o[0].transpose(0, 1)
    return out.reshape(q.shape[0], -1)


def sink_and_window(model, w: Mapping[str, torch.Tensor], layer: int) -> dict:
    """The attention variant's arguments of `layer`: its window (0: none) and sinks (None: none)."""
    return {"window": model.window(layer), "sinks": w["sinks"] if model.attention_sinks else None}


def attention_torch(model, w: Mapping[str, torch.Tensor], a: torch.Tensor, cache: KVCache, layer: int,
                    chunk: Chunk, tables: ChunkTables) -> torch.Tensor:
    """The attention output [t, heads * d] of normed rows a [t, H]; k, v written to the cache."""
    q, k, v = norm_and_rotate(model, w, project_qkv(model, w, a), tables)
    if cache.is_ring(layer) and not tables.decode:
        return attend_prefill_ring(cache, layer, chunk, q, k, v, tables, **sink_and_window(model, w, layer))
    cache.write(layer, tables.rows_of(cache, layer), k, v)
    if tables.decode:
        return attend_decode(cache, layer, q, tables, **sink_and_window(model, w, layer))
    return attend_prefill(cache, layer, chunk, q, tables, **sink_and_window(model, w, layer))


def fuse_qkv(weights: dict[str, torch.Tensor], layers) -> None:
    """Replace each layer's wq, wk, wv (and bq, bk, bv) by column views of one fused tensor, made
    once at set-up (idempotent): the projection is then one GEMM."""
    from pyengine.model.tensors import weight_key

    for layer in layers:
        for fused, parts in (("wqkv", ("wq", "wk", "wv")), ("bqkv", ("bq", "bk", "bv"))):
            keys = [weight_key(p, layer) for p in parts]
            if weight_key(fused, layer) in weights or not all(k in weights for k in keys):
                continue
            dim = weights[keys[0]].dim() - 1
            cat = torch.cat([weights[k] for k in keys], dim=dim)
            weights[weight_key(fused, layer)] = cat
            for k, piece in zip(keys, cat.split([weights[k].shape[dim] for k in keys], dim=dim)):
                weights[k] = piece
