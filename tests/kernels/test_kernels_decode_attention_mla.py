"""Paged MLA decode (absorbed form, kernels/decode_attention_mla.py) vs a reference that gathers each
row's latent rows by hand and writes the softmax out, in float64. CPU: the Triton interpreter, fp32,
tiny widths that are not powers of two, rows crossing several 16-key tiles and splits, a padding row,
more heads than one 16-head block."""

import pytest
import torch

from pyengine.kernels.decode_attention_mla import DecodeMLA, decode_mla
from pyengine.kernels.launch_count import counting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# fp32: against the float64 reference. Low precision: the kernel's error against float64 at most
# `factor` x plain torch's error in the same dtype, plus a floor for shapes where torch's is ~0.
TOLERANCES = {torch.float32: dict(atol=2e-6, rtol=2e-5), torch.float16: dict(factor=2.0, floor=1e-3),
              torch.bfloat16: dict(factor=2.0, floor=8e-3)}


def reference(q, cache, block_table, slots, seq_lens, latent, scale, dtype=torch.float64):
    """dtype float64: the exact answer; q's dtype: what plain torch computes in it (softmax fp32)."""
    n, heads, _ = q.shape
    bs = cache.shape[1]
    q, cache, block_table = q.cpu(), cache.cpu(), block_table.cpu()
    out = torch.zeros(n, heads, latent, dtype=torch.float64)
    for i in range(n):
        slot, length = int(slots[i]), int(seq_lens[i])
        if slot < 0:
            continue
        pos = torch.arange(length)
        rows = cache[block_table[slot].long()[pos // bs], pos % bs, 0].to(dtype)  # [keys, latent + rope]
        for h in range(heads):
            qh = q[i, h].to(dtype)
            scores = (rows[:, :latent] @ qh[:latent] + rows[:, latent:] @ qh[latent:]).double() * scale
            p = torch.softmax(scores, 0)
            out[i, h] = (p.to(dtype) @ rows[:, :latent]).double()
    return out


def check_close(out, case, latent, scale):
    exact = reference(*case, latent, scale)
    err = (out.double().cpu() - exact).abs().max().item()
    tol = TOLERANCES[out.dtype]
    if out.dtype == torch.float32:
        bound = tol["atol"] + tol["rtol"] * exact.abs().max().item()
    else:
        torch_err = (reference(*case, latent, scale, dtype=out.dtype) - exact).abs().max().item()
        bound = tol["factor"] * torch_err + tol["floor"] * max(1.0, exact.abs().max().item())
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


def make_case(heads, latent, rope, block_size, lens, seed=0, padding=(), dtype=torch.float32):
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
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)  # noqa: E731
    i32 = lambda t: t.to(device=DEVICE, dtype=torch.int32)  # noqa: E731
    return cast(q), cast(cache), i32(block_table), i32(slots), i32(torch.tensor(lens))


@pytest.mark.parametrize("heads,latent,rope,lens,padding", [
    (3, 12, 6, [1, 37, 20], (2,)),  # one key; many tiles; a padding row; widths not powers of two
    (17, 16, 4, [5, 16], ()),  # two head blocks (the second of one head); a row of exactly one tile
])
def test_matches_the_gathered_reference(heads, latent, rope, lens, padding):
    q, cache, bt, slots, seq = make_case(heads, latent, rope, 4, lens, padding=padding)
    scale = 0.37
    got = decode_mla(q, cache, bt, slots, seq, latent=latent, scale=scale)
    want = reference(q, cache, bt, slots, seq, latent, scale)
    torch.testing.assert_close(got.double().cpu(), want, **TOLERANCES[torch.float32])
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


def test_fp16_within_twice_torchs_own_error():
    case = make_case(5, 24, 8, 8, [3, 50], seed=2, dtype=torch.float16)
    check_close(decode_mla(*case, latent=24, scale=0.2), case, 24, 0.2)


@pytest.mark.gpu
def test_bf16_moonlight_shapes_on_gpu():
    """16 heads, kv_lora 512, rope 64 (Moonlight-16B-A3B), 16-key blocks, rows up to 4096 keys."""
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 4097, (32,), generator=g).tolist()
    lens[:3] = [1, 4096, 17]
    case = make_case(16, 512, 64, 16, lens, seed=1, padding=(5,), dtype=torch.bfloat16)
    scale = 192 ** -0.5
    check_close(decode_mla(*case, latent=512, scale=scale), case, 512, scale)
