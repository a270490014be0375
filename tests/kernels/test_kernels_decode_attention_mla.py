"""Paged MLA decode (absorbed form, kernels/decode_attention_mla.py) vs a reference that gathers each
row's latent rows by hand and writes the softmax out, in float64. CPU: the Triton interpreter, fp32,
tiny widths that are not powers of two, rows crossing several 16-key tiles and splits, a padding row,
more heads than one 16-head block."""

import pytest
import torch

from pyengine.kernels.decode_attention_mla import DecodeMLA, decode_mla
from pyengine.kernels.launch_count import counting

TOLERANCES = {torch.float32: dict(atol=2e-6, rtol=2e-5)}


def reference(q, cache, block_table, slots, seq_lens, latent, scale):
    n, heads, _ = q.shape
    bs = cache.shape[1]
    out = torch.zeros(n, heads, latent, dtype=torch.float64)
    for i in range(n):
        slot, length = int(slots[i]), int(seq_lens[i])
        if slot < 0:
            continue
        pos = torch.arange(length)
        rows = cache[block_table[slot].long()[pos // bs], pos % bs, 0].double()  # [keys, latent + rope]
        for h in range(heads):
            qh = q[i, h].double()
            scores = (rows[:, :latent] @ qh[:latent] + rows[:, latent:] @ qh[latent:]) * scale
            out[i, h] = torch.softmax(scores, 0) @ rows[:, :latent]
    return out


def make_case(heads, latent, rope, block_size, lens, seed=0, padding=()):
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    max_blocks = -(-max(lens) // block_size) + 1
    num_slots = 2 * n + 1
    num_blocks = num_slots * max_blocks + 1
    cache = torch.randn(num_blocks, block_size, 1, latent + rope, generator=g)
    block_table = torch.randperm(num_blocks - 1, generator=g)[: num_slots * max_blocks].view(
        num_slots, max_blocks).to(torch.int32)
    slots = torch.tensor([-1 if i in padding else 2 * i + 1 for i in range(n)], dtype=torch.int32)
    q = torch.randn(n, heads, latent + rope, generator=g)
    return q, cache, block_table, slots, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("heads,latent,rope,lens,padding", [
    (3, 12, 6, [1, 37, 20], (2,)),  # one key; many tiles; a padding row; widths not powers of two
    (17, 16, 4, [5, 16], ()),  # two head blocks (the second of one head); a row of exactly one tile
])
def test_matches_the_gathered_reference(heads, latent, rope, lens, padding):
    q, cache, bt, slots, seq = make_case(heads, latent, rope, 4, lens, padding=padding)
    scale = 0.37
    got = decode_mla(q, cache, bt, slots, seq, latent=latent, scale=scale)
    want = reference(q, cache, bt, slots, seq, latent, scale)
    torch.testing.assert_close(got.double(), want, **TOLERANCES[torch.float32])
    for i in padding:
        assert not got[i].any()


def test_prepared_call_is_two_launches_and_reuses_its_buffers():
    q, cache, bt, slots, seq = make_case(3, 12, 6, 4, [9, 30])
    attn = DecodeMLA(4, 3, 12, 6, 4, bt.shape[1], torch.float32, "cpu")
    out = torch.empty(2, 3, 12)
    with counting() as launches:
        attn(q, cache, bt, slots, seq, out, scale=0.5)
    assert launches.triton == 2
    torch.testing.assert_close(out.double(), reference(q, cache, bt, slots, seq, 12, 0.5),
                               **TOLERANCES[torch.float32])


@pytest.mark.parametrize("kwargs,match", [
    (dict(latent=18), "latent=18"),
    (dict(latent=12, scale=0.0), "scale=0.0"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    q, cache, bt, slots, seq = make_case(3, 12, 6, 4, [3])
    with pytest.raises(ValueError, match=match):
        decode_mla(q, cache, bt, slots, seq, **{"scale": 0.5, **kwargs})
