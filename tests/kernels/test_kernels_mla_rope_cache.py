"""MLA's preparation in one launch (q's rotary part turned; the latent normed, the shared key
turned, both written into the paged latent cache) vs a reference that does each step by hand.
CPU: the Triton interpreter, fp32/fp16. GPU (`-m gpu`): bf16."""

import pytest
import torch

from pyengine.kernels.launch_count import counting
from pyengine.kernels.mla_rope_cache import MLARopeCache, mla_rope_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
HEADS, NOPE, ROPE, LORA, PAGE = 3, 6, 6, 12, 4  # odd head count, widths not powers of two


def tables(max_positions, r, theta=500.0):
    inv = 1.0 / theta ** (torch.arange(0, r, 2, dtype=torch.float64) / r)
    angle = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv[None, :]
    return angle.cos().float(), angle.sin().float()


def reference(q, kv, positions, slots, block_table, cache, cos, sin, norm_w):
    """(q_out, cache) the obvious way, in float64 after the norm's one rounding to the dtype."""
    dtype, n = q.dtype, q.shape[0]
    half = ROPE // 2

    def turn(x, p):  # rotate-half by position p
        c = torch.cat([cos[p], cos[p]]).double()
        s = torch.cat([sin[p], sin[p]]).double()
        x = x.double()
        return x * c + torch.cat([-x[..., half:], x[..., :half]], -1) * s

    q_out = q.cpu().clone()
    cache = cache.cpu().clone()
    for i in range(n):
        slot, p = int(slots[i]), int(positions[i])
        if slot < 0:
            q_out[i] = 0
            continue
        q_out[i, :, NOPE:] = turn(q[i, :, NOPE:].cpu(), p).to(dtype)
        c = kv[i, :LORA].float().cpu()
        c = (c * torch.rsqrt(c.pow(2).mean() + EPS) * norm_w.float().cpu()).to(dtype)
        block = int(block_table[slot, p // PAGE])
        cache[block, p % PAGE, 0] = torch.cat([c, turn(kv[i, LORA:].cpu(), p).to(dtype)])
    return q_out, cache


def case(dtype, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, HEADS, NOPE + ROPE, generator=g).to(dtype)
    kv = (torch.randn(n, LORA + ROPE, generator=g) * 3).to(dtype)
    positions = torch.tensor([0, 5, 3, 9, 2][:n], dtype=torch.int32)
    slots = torch.tensor([1, 0, -1, 2, 1][:n], dtype=torch.int32)
    block_table = torch.tensor([[4, 1, 6], [0, 2, 7], [3, 5, 8]], dtype=torch.int32)
    cache = torch.randn(9, PAGE, 1, LORA + ROPE, generator=g).to(dtype)
    cos, sin = tables(12, ROPE)
    norm_w = (torch.rand(LORA, generator=g) + 0.5).to(dtype)
    return [t.to(DEVICE) for t in (q, kv, positions, slots, block_table, cache, cos, sin, norm_w)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_equals_the_step_by_step_reference(dtype):
    args = case(dtype)
    want_q, want_cache = reference(*args)
    cache_before = args[5].clone()
    q_out = mla_rope_cache(*args, eps=EPS)
    tol = dict(atol=1e-6, rtol=1e-6) if dtype == torch.float32 else dict(atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(q_out.cpu(), want_q, **tol)
    torch.testing.assert_close(args[5].cpu(), want_cache, **tol)
    # only the live rows' cache rows changed (the padding row wrote nothing)
    changed = (args[5] != cache_before).any(-1).any(-1).nonzero().tolist()
    assert sorted(map(tuple, changed)) == [(0, 0), (0, 2), (1, 1), (8, 1)]


def test_the_prepared_call_is_one_launch_and_matches_the_checked_one():
    args = case(torch.float32, seed=3)
    expect = mla_rope_cache(*[a.clone() for a in args], eps=EPS)
    prepared = MLARopeCache(HEADS, NOPE, ROPE, LORA, PAGE, torch.float32, DEVICE)
    q_out = torch.empty_like(args[0])
    with counting() as launches:
        prepared(*args, q_out, eps=EPS)
    assert launches.triton == 1
    torch.testing.assert_close(q_out, expect, rtol=0, atol=0)


@pytest.mark.parametrize("change,words", [
    (lambda a: a.__setitem__(8, a[8][:-1]), "norm_w.shape=(11,): must be [12]"),
    (lambda a: a.__setitem__(2, a[2] + 20), "positions: values span"),
    (lambda a: a.__setitem__(0, a[0][..., :ROPE]), "q must be [n, heads, nope + 6]"),
])
def test_bad_arguments_are_refused_naming_them(change, words):
    args = case(torch.float32)
    change(args)
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")
                       .replace("+", r"\+")):
        mla_rope_cache(*args, eps=EPS)


@pytest.mark.gpu
def test_bf16_on_gpu():
    args = case(torch.bfloat16)
    want_q, want_cache = reference(*args)
    q_out = mla_rope_cache(*args, eps=EPS)
    torch.testing.assert_close(q_out.cpu(), want_q, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(args[5].cpu(), want_cache, atol=2e-2, rtol=2e-2)
