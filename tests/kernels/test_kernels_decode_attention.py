"""Paged split-K decode attention vs a reference that gathers each row's keys by hand.

CPU: the Triton interpreter, fp32 and fp16, tiny head counts (16-key tiles, so rows of a few
hundred keys cross many tiles and several splits). GPU (`-m gpu`): bf16 at decode shapes.
"""

import math

import pytest
import torch

from pyengine.kernels.decode_attention import (DecodeAttention, decode_attention,
                                               decode_attention_config, split_count)
from pyengine.kernels.launch_count import counting

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32: against the float64 reference. Low precision: the kernel's error against the float64
# reference may be at most `factor` x plain torch's error in the same dtype (scores and p @ v
# in that dtype, softmax in fp32), plus a floor for shapes where torch's own error is ~0.
TOLERANCES = {
    torch.float32: dict(atol=2e-6, rtol=2e-5),
    torch.float16: dict(factor=2.0, floor=1e-3),
    torch.bfloat16: dict(factor=2.0, floor=8e-3),
}


def reference(q, k_cache, v_cache, block_table, slots, seq_lens, *, sinks=None, window=0,
              scale=None, dtype=torch.float64):
    """Loop over rows and heads: gather the row's keys through its block table, softmax.
    dtype float64: the exact answer; q's dtype: what plain torch computes in that dtype."""
    n, heads, d = q.shape
    block_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = heads // kv_heads
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = torch.zeros(n, heads, d, dtype=torch.float64)
    for i in range(n):
        slot, length = int(slots[i]), int(seq_lens[i])
        if slot < 0:
            continue  # padding row: zeros
        pos = torch.arange(max(0, length - window) if window else 0, length)
        blocks = block_table[slot].long().cpu()[pos // block_size]
        k = k_cache.cpu()[blocks, pos % block_size]  # [keys, kv_heads, d]
        v = v_cache.cpu()[blocks, pos % block_size]
        for h in range(heads):
            kh, vh = k[:, h // group].to(dtype), v[:, h // group].to(dtype)
            scores = (kh @ q[i, h].cpu().to(dtype)).double() * scale
            if sinks is not None:
                scores = torch.cat([scores, sinks[h:h + 1].cpu().double()])
            p = torch.softmax(scores, 0)[: pos.numel()]
            out[i, h] = (p.to(dtype) @ vh).double() if dtype != torch.float64 else p @ vh
    return out


def make_case(heads, kv_heads, d, block_size, lens, dtype, *, seed=0, padding=()):
    """Shuffled block tables, rows on non-consecutive slots, rows in `padding` on slot -1."""
    g = torch.Generator().manual_seed(seed)
    n = len(lens)
    max_blocks = -(-max(lens) // block_size) + 1
    num_slots = 2 * n + 1
    num_blocks = num_slots * max_blocks + 3
    table = torch.randperm(num_blocks, generator=g)[: num_slots * max_blocks].view(num_slots, max_blocks)
    slots = torch.randperm(num_slots, generator=g)[:n]
    slots[list(padding)] = -1
    cast = lambda t: t.to(device=DEVICE, dtype=dtype)
    q = cast(torch.randn(n, heads, d, generator=g))
    k_cache = cast(torch.randn(num_blocks, block_size, kv_heads, d, generator=g))
    v_cache = cast(torch.randn(num_blocks, block_size, kv_heads, d, generator=g))
    i32 = lambda t: t.to(device=DEVICE, dtype=torch.int32)
    return q, k_cache, v_cache, i32(table), i32(slots), i32(torch.tensor(lens))


def check_close(out, case, **kw):
    exact = reference(*case, **kw)
    err = (out.double().cpu() - exact).abs().max().item()
    tol = TOLERANCES[out.dtype]
    if out.dtype == torch.float32:
        bound = tol["atol"] + tol["rtol"] * exact.abs().max().item()
    else:
        torch_err = (reference(*case, dtype=out.dtype, **kw) - exact).abs().max().item()
        bound = tol["factor"] * torch_err + tol["floor"] * max(1.0, exact.abs().max().item())
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


LENS = [1, 2, 17, 300]  # one key, two, a partial tile past a block, a few hundred


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("heads,kv_heads,d,block_size", [
    (2, 2, 64, 16),  # GQA ratio 1 (plain multi-head)
    (4, 1, 128, 32),  # ratio 4, d=128, 32-key blocks
    (8, 1, 64, 32),  # ratio 8
    (8, 2, 128, 16),  # ratio 4 over two kv heads: the kv head of each query head matters
])
def test_matches_reference(heads, kv_heads, d, block_size, dtype):
    case = make_case(heads, kv_heads, d, block_size, LENS, dtype, seed=heads + d)
    check_close(decode_attention(*case), case)


@pytest.mark.parametrize("d", [80, 24])  # not powers of two: padded to 128 / 32 with masks
def test_head_dim_not_a_power_of_two(d):
    case = make_case(4, 2, d, 16, [33, 5], torch.float32, seed=d)
    check_close(decode_attention(*case), case)


def test_padding_rows_are_zeros_and_others_unaffected():
    case = make_case(4, 2, 64, 16, [17, 40, 3, 9], torch.float16, seed=3, padding=(1, 3))
    out = decode_attention(*case)
    assert bool((out[1] == 0).all()) and bool((out[3] == 0).all())
    check_close(out, case)


def test_sinks_join_the_denominator():
    case = make_case(4, 2, 64, 16, [1, 17, 120], torch.float32, seed=4)
    sinks = torch.tensor([0.5, -1.0, 3.0, 0.0], device=DEVICE)
    out = decode_attention(*case, sinks=sinks)
    check_close(out, case, sinks=sinks)
    assert not torch.allclose(out, decode_attention(*case), atol=1e-3)


@pytest.mark.parametrize("window", [1, 5, 16, 64])  # own key only, inside a tile, one block, > row 1
def test_sliding_window_keeps_the_last_keys(window):
    case = make_case(4, 1, 64, 16, [2, 17, 130], torch.float32, seed=window)
    check_close(decode_attention(*case, window=window), case, window=window)


def test_window_and_sinks_together_and_a_custom_scale():
    case = make_case(2, 1, 32, 16, [50, 7], torch.float16, seed=6)
    sinks = torch.tensor([1.0, -0.5], device=DEVICE)
    out = decode_attention(*case, sinks=sinks, window=20, scale=0.3)
    check_close(out, case, sinks=sinks, window=20, scale=0.3)


@pytest.mark.parametrize("window,block_size", [(7, 4), (16, 16), (1, 4)])
def test_a_ring_table_serves_a_window_over_any_length(window, block_size):
    """A sliding layer's ring (ring_blocks(window) entries a slot, position p in entry
    (p // block_size) % entries): sequences many times the ring's length, written position by
    position as a sequence grows, read back as the last `window` keys of the whole sequence."""
    case = check_ring(window, block_size, [5, 29, 40, 13, 90], 4, 2, 16, torch.float32, atol=2e-6, rtol=2e-5)
    with pytest.raises(ValueError, match=r"seq_lens: live rows span \[5, 90\]"):  # no window: no ring
        decode_attention(*case)


def check_ring(window, block_size, lens, heads, kv_heads, d, dtype, **tol):
    """The ring written position by position; the kernel's output vs the plain float64 answer over
    each sequence's last `window` keys (inputs rounded to `dtype` first). Returns the case."""
    g = torch.Generator().manual_seed(window)
    entries = -(-window // block_size)  # paged_checks.ring_blocks: ceil(window / block_size)
    n, group = len(lens), heads // kv_heads
    table = torch.arange(n * entries).view(n, entries)
    k_cache, v_cache = (torch.zeros(n * entries, block_size, kv_heads, d, dtype=dtype) for _ in range(2))
    keys = [torch.randn(L, kv_heads, d, generator=g).to(dtype) for L in lens]
    values = [torch.randn(L, kv_heads, d, generator=g).to(dtype) for L in lens]
    for row, L in enumerate(lens):
        for p in range(L):
            block = table[row, (p // block_size) % entries]
            k_cache[block, p % block_size], v_cache[block, p % block_size] = keys[row][p], values[row][p]
    q = torch.randn(n, heads, d, generator=g).to(dtype)
    sinks = torch.randn(heads, generator=g)
    i32 = lambda t: t.to(device=DEVICE, dtype=torch.int32)
    case = [q.to(DEVICE), k_cache.to(DEVICE), v_cache.to(DEVICE), i32(table), i32(torch.arange(n)),
            i32(torch.tensor(lens))]
    out = decode_attention(*case, sinks=sinks.to(DEVICE), window=window)
    for row, L in enumerate(lens):  # the plain answer over the whole sequence's last `window` keys
        k, v = keys[row][L - min(L, window):].double(), values[row][L - min(L, window):].double()
        for h in range(heads):
            s = torch.cat([k[:, h // group] @ q[row, h].double() / math.sqrt(d), sinks[h:h + 1].double()])
            want = torch.softmax(s, 0)[:-1] @ v[:, h // group]
            torch.testing.assert_close(out[row, h].double().cpu(), want, **tol)
    return case


def test_many_splits_combine_and_two_launches_whatever_the_lengths():
    attn = DecodeAttention(4, 4, 1, 64, 16, 20, torch.float32, DEVICE)
    assert attn.splits[1] > 4  # one row, one kv head: the keys are split to fill the device
    outs = []
    for lens in ([300], [1]):
        case = make_case(4, 1, 64, 16, lens, torch.float32, seed=7)
        case = case[:3] + (torch.nn.functional.pad(case[3], (0, 20 - case[3].shape[1])),) + case[4:]
        out = torch.empty_like(case[0])
        with counting() as c:
            assert attn(*case, out) is out
        assert c.triton == 2
        check_close(out, case)
        outs.append(out)


def test_rows_reuse_one_prepared_object_at_smaller_counts():
    attn = DecodeAttention(5, 4, 2, 64, 16, 30, torch.float16, DEVICE)
    for lens in ([17, 300, 2], [44]):
        case = make_case(4, 2, 64, 16, lens, torch.float16, seed=len(lens))
        table = torch.nn.functional.pad(case[3], (0, 30 - case[3].shape[1]))
        case = case[:3] + (table,) + case[4:]
        check_close(attn(*case, torch.empty_like(case[0])), case)


def test_split_count_fills_the_device_from_static_shapes():
    assert split_count(1, 8, 32768, 64, 132) == 33  # 264 programs over 8 kv heads
    assert split_count(256, 8, 32768, 64, 132) == 1
    assert split_count(1, 1, 40, 16, 132) == 3  # never more splits than tiles
    assert split_count(1, 1, 10 ** 6, 16, 10 ** 4) == 64  # MAX_SPLITS


def test_config_pin(monkeypatch):
    monkeypatch.setenv("PYENGINE_DECODE_ATTENTION_CONFIG", "BLOCK_N=32,num_warps=8")
    cfg = decode_attention_config(80, 4, torch.device("cuda"))
    assert (cfg["BLOCK_N"], cfg["num_warps"], cfg["BLOCK_D"], cfg["BLOCK_G"]) == (32, 8, 128, 16)
    monkeypatch.setenv("PYENGINE_DECODE_ATTENTION_CONFIG", "BLOCK_N=24")
    with pytest.raises(ValueError, match="BLOCK_N=24: must be a power of two >= 16"):
        decode_attention_config(64, 1, torch.device("cuda"))


def _bad(name):
    case = list(make_case(4, 2, 64, 16, [17, 3], torch.float32, seed=9))
    q, k, v, table, slots, lens = case
    cases = {
        "q dims": (0, q[0], ValueError, r"q\.shape=\(4, 64\): must have 3 dims"),
        "k dtype": (1, k.half(), TypeError, r"k_cache\.dtype=torch\.float16: must be one of"),
        "v shape": (2, v[:, :, :1], ValueError, r"v_cache\.shape=.*: must be \[num_blocks, block_size, 2, 64\]"),
        "gqa": (0, q[:, :3], ValueError, r"heads=3: must be a multiple of kv_heads=2"),
        "block size": (1, k[:, :12].contiguous(), ValueError, r"k_cache\.shape\[1\]=12: block_size must be a power of two"),
        "table dtype": (3, table.long(), TypeError, r"block_table\.dtype=torch\.int64"),
        "slots len": (4, slots[:1], ValueError, r"slots\.shape=\(1,\): must be \[n=2\]"),
        "slot range": (4, slots.clone().fill_(99), ValueError, r"slots: values span \[99, 99\]"),
        "too long": (5, lens.clone().fill_(10 ** 4), ValueError, r"seq_lens: live rows span .*max_blocks \* block_size"),
        "bad block": (3, table.clone().fill_(10 ** 6), ValueError, r"block_table\[\d+\]: blocks used by row 0"),
    }
    i, value, exc, match = cases[name]
    case[i] = value
    return case, exc, match


@pytest.mark.parametrize("name", ["q dims", "k dtype", "v shape", "gqa", "block size", "table dtype",
                                  "slots len", "slot range", "too long", "bad block"])
def test_bad_input_names_the_argument(name):
    case, exc, match = _bad(name)
    with pytest.raises(exc, match=match):
        decode_attention(*case)


def test_bad_keyword_arguments():
    case = make_case(4, 2, 64, 16, [17, 3], torch.float32, seed=9)
    with pytest.raises(ValueError, match=r"window=-1: must be an int >= 0"):
        decode_attention(*case, window=-1)
    with pytest.raises(ValueError, match=r"sinks\.shape=\(2,\): must be \[heads=4\]"):
        decode_attention(*case, sinks=torch.zeros(2, device=DEVICE))
    with pytest.raises(ValueError, match=r"scale=0: must be a finite number > 0"):
        decode_attention(*case, scale=0)
    with pytest.raises(ValueError, match=r"head_dim=512: must be <= 256"):
        DecodeAttention(1, 1, 1, 512, 16, 4, torch.float32, DEVICE)


@pytest.mark.gpu
def test_bf16_ring_at_gpt_oss_shapes_on_gpu():
    """gpt-oss's sliding layers: a window of 128 over 16-key blocks (a ring of 8), 64 query heads
    over 8 kv heads of 64, sequences up to 4000 keys; bf16 inputs, the answer in float64 from the
    same rounded inputs (the kernel rounds p to bf16 for p @ v and the output once)."""
    check_ring(128, 16, [1, 127, 128, 129, 4000, 1000], 64, 8, 64, torch.bfloat16, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_bf16_decode_shapes_on_gpu():
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, 4097, (64,), generator=g).tolist()
    lens[:3] = [1, 4096, 17]
    case = make_case(8, 2, 128, 16, lens, torch.bfloat16, seed=1, padding=(5,))
    check_close(decode_attention(*case), case)
    sinks = torch.randn(8, generator=g).cuda()
    check_close(decode_attention(*case, sinks=sinks, window=128), case, sinks=sinks, window=128)
