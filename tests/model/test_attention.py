"""Attention over the KV cache (pyengine.model.attention) against plain formulas written here: a
prefill chunk after an earlier chunk of its sequence, a decode group of sequences of different
lengths, GQA; and the cache itself."""

import math

import torch

from pyengine.core.spec import load_spec
from pyengine.model.attention import attend, chunk_tables
from pyengine.model.batch import Batch
from pyengine.model.kv_cache import KVCache

from helpers import TINY_CONFIG

SPEC = load_spec(TINY_CONFIG).replace(model={"num_layers": 1, "num_attention_heads": 4,
                                             "num_key_value_heads": 2, "head_dim": 6})


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


def test_a_later_chunk_reads_the_earlier_chunks_keys():
    g = torch.Generator().manual_seed(0)
    b = Batch.prefill([7], 2)  # chunks: positions 0-3, then 4-6
    cache = KVCache(SPEC, 1, 7, "cpu", torch.float32)
    q, k, v = (torch.randn(7, n, 6, generator=g) for n in (4, 2, 2))
    outs = []
    for c in b.chunks:
        pos = torch.tensor(b.positions()[c.lo:c.hi])
        tables = chunk_tables(SPEC.model, c, pos, torch.float32)
        outs.append(attend(cache, 0, c, q[c.lo:c.hi], k[c.lo:c.hi], v[c.lo:c.hi], tables))
    assert torch.allclose(outs[1], plain(q[4:], k, v), atol=1e-5)
    assert torch.allclose(outs[0], plain(q[:4], k[:4], v[:4]), atol=1e-5)


def test_a_decode_group_of_different_lengths():
    g = torch.Generator().manual_seed(1)
    cache = KVCache(SPEC, 3, 10, "cpu", torch.float32)
    assert not cache.k.any() and not cache.v.any()  # zeroed: a masked-out row is never a NaN
    lengths = [5, 2, 8]  # tokens cached before this step
    keys = [torch.randn(n + 1, 2, 6, generator=g) for n in lengths]
    vals = [torch.randn(n + 1, 2, 6, generator=g) for n in lengths]
    for s, n in enumerate(lengths):
        cache.k[0, s, :, :n] = keys[s][:n].transpose(0, 1)
        cache.v[0, s, :, :n] = vals[s][:n].transpose(0, 1)
    b = Batch.decode(lengths, 1)
    (c,) = b.chunks
    q = torch.randn(3, 4, 6, generator=g)
    tables = chunk_tables(SPEC.model, c, torch.tensor(b.positions()), torch.float32)
    got = attend(cache, 0, c, q, torch.stack([k[-1] for k in keys]), torch.stack([v[-1] for v in vals]), tables)
    for s in range(3):
        assert torch.allclose(got[s], plain(q[s:s + 1], keys[s], vals[s])[0], atol=1e-5)
