"""Attention over the paged KV cache (pyengine.model.attention, the torch path) against plain formulas
written here: a prefill chunk after an earlier chunk of its sequence, a decode group of sequences of
different lengths in non-consecutive slots whose blocks are scattered, padding rows, GQA; and the
cache's block allocator."""

import math

import pytest
import torch

from pyengine.core.errors import ResourceError
from pyengine.core.spec import load_spec
from pyengine.model.attention import RopeTables, attention_torch, chunk_tables, fuse_qkv, host_meta, key_blocks
from pyengine.model.batch import Batch
from pyengine.model.kv_cache import BlockAllocator, KVCache, cache_bytes
from pyengine.model.tensors import LayerWeights

from helpers import TINY_CONFIG

SPEC = load_spec(TINY_CONFIG).replace(model={"num_layers": 1, "num_attention_heads": 4,
                                             "num_key_value_heads": 2, "head_dim": 6})
M = SPEC.model


def plain(q, k, v):
    """q [t, heads, d] at the last t positions of k, v [n, kv, d]: causal softmax(q.k/sqrt d) v."""
    t, heads, d = q.shape
    n = k.shape[0]
    out = torch.empty(t, heads, d)
    for i in range(t):
        for h in range(heads):
            kh, vh = k[: n - t + i + 1, h // 2], v[: n - t + i + 1, h // 2]
            out[i, h] = torch.softmax(kh @ q[i, h] / math.sqrt(d), 0) @ vh
    return out.reshape(t, heads * d)


def rotate(x, pos, theta):
    """Rotate-half RoPE of x [t, heads, d] at positions pos, written out."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.tensor(pos, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None], torch.cat([ang.sin()] * 2, -1)[:, None]
    rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
    return x * cos + rot * sin


def weights(seed):
    g = torch.Generator().manual_seed(seed)
    h, d = M.hidden_size, M.head_size
    w = {"wq": torch.randn(h, M.heads * d, generator=g) / h ** 0.5,
         "wk": torch.randn(h, M.kv_heads * d, generator=g) / h ** 0.5,
         "wv": torch.randn(h, M.kv_heads * d, generator=g) / h ** 0.5}
    plain_w = dict(w)
    fuse_qkv(w, [None])
    return LayerWeights(w, None), plain_w


def run(cache, rope, batch, a, w, layer=0):
    outs = []
    for c in batch.chunks:
        meta = torch.tensor(host_meta(c), dtype=torch.int32)
        tables = chunk_tables(cache, rope, c, meta, torch.float32, key_blocks(c, cache.block_size))
        outs.append(attention_torch(M, w, a[c.lo:c.hi], cache, layer, c, tables))
    return outs


def projected(a, pw, pos):
    t = a.shape[0]
    q = rotate((a @ pw["wq"]).view(t, M.heads, -1), pos, M.rope_theta)
    k = rotate((a @ pw["wk"]).view(t, M.kv_heads, -1), pos, M.rope_theta)
    return q, k, (a @ pw["wv"]).view(t, M.kv_heads, -1)


def test_a_later_chunk_reads_the_earlier_chunks_keys_across_blocks():
    g = torch.Generator().manual_seed(0)
    b = Batch.prefill([7], 2)  # chunks: positions 0-3, then 4-6; blocks of 2 rows
    cache = KVCache(SPEC, 1, 7, "cpu", torch.float32, block_size=2)
    cache.grow({0: 7})
    rope = RopeTables.make(7, M.head_size, M.rope_theta, "cpu")
    w, pw = weights(0)
    a = torch.randn(7, M.hidden_size, generator=g)
    outs = run(cache, rope, b, a, w)
    q, k, v = projected(a, pw, list(range(7)))
    assert torch.allclose(outs[1], plain(q[4:], k, v), atol=1e-5)
    assert torch.allclose(outs[0], plain(q[:4], k[:4], v[:4]), atol=1e-5)


def test_a_decode_group_in_scattered_slots_and_blocks_with_a_padding_row():
    g = torch.Generator().manual_seed(1)
    cache = KVCache(SPEC, 5, 12, "cpu", torch.float32, block_size=4)
    assert not cache.k.any() and not cache.v.any()  # zeroed: a masked-out row is never a NaN
    rope = RopeTables.make(12, M.head_size, M.rope_theta, "cpu")
    w, pw = weights(1)
    slots, past = [3, 0, 4], [5, 2, 9]  # tokens cached before this step, per slot
    cache.grow({0: 1, 4: 1, 3: 1})  # interleave the allocations: a slot's blocks are not adjacent
    prompts = {s: torch.randn(n + 1, M.hidden_size, generator=g) for s, n in zip(slots, past)}
    for s, n in zip(slots, past):  # each prompt prefilled alone (the new token not yet cached)
        cache.grow({s: n + 1})
        run(cache, rope, Batch((n,), (0,), 1, slots=(s,)), prompts[s][:n], w)
    assert cache.allocator.table[4] == [1, 4, 5]  # scattered: slots 3 and 0 took blocks between
    b = Batch.decode(past, 1, slots=slots)
    (c,) = b.chunks
    a = torch.stack([prompts[s][-1] for s in slots])
    meta = torch.tensor(host_meta(c, padding=1), dtype=torch.int32)  # one padding row (a graph bucket)
    tables = chunk_tables(cache, rope, c, meta, torch.float32, key_blocks(c, cache.block_size))
    a_pad = torch.cat([a, torch.randn(1, M.hidden_size, generator=g)])
    got = attention_torch(M, w, a_pad, cache, 0, c, tables)
    for i, (s, n) in enumerate(zip(slots, past)):
        q, k, v = projected(prompts[s], pw, list(range(n + 1)))
        assert torch.allclose(got[i], plain(q[-1:], k, v)[0], atol=1e-5)
    assert torch.isfinite(got[3]).all()  # the padding row read the trash block
    for s in slots:  # the padding row wrote into no slot's blocks
        assert cache.allocator.table[s] and cache.trash not in cache.allocator.table[s]


def test_allocator_hands_out_the_lowest_free_blocks_and_reuses_freed_ones():
    alloc = BlockAllocator(blocks=6, block_size=4, slots=3, max_blocks=3)
    assert alloc.grow(0, 5) == [(0, 0, 0), (0, 1, 1)]
    assert alloc.grow(1, 1) == [(1, 0, 2)]
    assert alloc.grow(0, 8) == []  # still two blocks
    alloc.release(0)
    assert alloc.free == 5 and alloc.table[0] == []
    assert alloc.grow(2, 12) == [(2, 0, 0), (2, 1, 1), (2, 2, 3)]
    with pytest.raises(ResourceError, match="at most 3"):
        alloc.grow(1, 13)
    with pytest.raises(ResourceError, match="2 are free"):
        alloc.grow(0, 12)


def test_cache_bytes_count_keys_and_values_of_whole_blocks_and_the_trash_block():
    spec = load_spec(TINY_CONFIG).replace(model={"num_layers": 3, "num_attention_heads": 4,
                                                 "num_key_value_heads": 2, "head_dim": 8})
    es = 4 if spec.model.dtype == "float32" else 2
    # 5 slots x ceil(20 / 16) = 2 blocks, + 1 trash block, 16 rows each, K and V, 3 layers
    assert cache_bytes(spec, 5, 20) == 2 * 3 * (5 * 2 + 1) * 16 * 2 * 8 * es
    cache = KVCache(spec, 5, 20, "cpu", torch.float32 if es == 4 else torch.bfloat16)
    assert cache.nbytes == cache.k.nbytes + cache.v.nbytes == cache_bytes(spec, 5, 20)
