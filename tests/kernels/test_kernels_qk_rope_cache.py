"""q/k norm + RoPE + paged KV write in one launch vs a reference that norms, rotates and scatters
into the cache by hand. CPU: the Triton interpreter, fp32/fp16. GPU (`-m gpu`): bf16."""

import pytest
import torch

from pyengine.kernels.launch_count import counting
from pyengine.kernels.qk_rope_cache import QKNorm, QKRopeCache, qk_rope_cache

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6

# fp32: one rounding of an fp32 computation. Low precision: at most `factor` x plain torch's
# error in that dtype (RoPE with the tables rounded to the dtype, as transformers computes it),
# plus a floor of a fraction of the dtype's spacing at 1.
TOLERANCES = {
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.float16: dict(factor=2.0, floor=1e-3),
    torch.bfloat16: dict(factor=2.0, floor=8e-3),
}


def tables(max_positions, d, theta=10000.0):
    """cos, sin [max_positions, d // 2] fp32 (pair i turns by position * theta^(-2i/d))."""
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv[None, :]
    return angle.cos().float(), angle.sin().float()


def reference(qkv, positions, slots, block_table, k_cache, v_cache, cos, sin, heads, norm,
              q_norm_w, k_norm_w, rope_dtype=torch.float64):
    """(q_out, k_cache, v_cache) the obvious way. The norm in fp32 rounded to the model dtype
    (as pyengine.model.math.rmsnorm); RoPE in rope_dtype (float64: exact; the model dtype:
    plain torch, tables rounded to it) on x * cos + rotate_half(x) * sin."""
    dtype = qkv.dtype
    n = qkv.shape[0]
    block_size, kv_heads, d = k_cache.shape[1:]
    q = qkv[:, : heads * d].float().cpu()
    k = qkv[:, heads * d:(heads + kv_heads) * d].float().cpu()
    v = qkv[:, (heads + kv_heads) * d:].cpu().view(n, kv_heads, d)

    def rms(x, w):
        return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w.float().cpu()).to(dtype)

    if norm == "full":
        q, k = rms(q, q_norm_w), rms(k, k_norm_w)
    q, k = q.view(n, heads, d), k.view(n, kv_heads, d)
    if norm == "per_head":
        q, k = rms(q, q_norm_w), rms(k, k_norm_w)
    c = torch.cat([cos, cos], 1)[positions.long().cpu()].to(rope_dtype)[:, None, :]
    s = torch.cat([sin, sin], 1)[positions.long().cpu()].to(rope_dtype)[:, None, :]
    rot = lambda x: torch.cat([-x[..., d // 2:], x[..., : d // 2]], -1)
    q, k = q.to(rope_dtype), k.to(rope_dtype)
    q_out, k_rot = q * c + rot(q) * s, k * c + rot(k) * s
    k_ref, v_ref = k_cache.cpu().double(), v_cache.cpu().double()
    for i in range(n):
        if int(slots[i]) < 0:
            q_out[i] = 0
            continue
        p = int(positions[i])
        block = int(block_table[int(slots[i]), p // block_size])
        k_ref[block, p % block_size] = k_rot[i].double()
        v_ref[block, p % block_size] = v[i].double()
    return q_out.double(), k_ref, v_ref


def make_case(n, heads, kv_heads, d, block_size, dtype, norm, *, seed=0, padding=()):
    g = torch.Generator().manual_seed(seed)
    num_slots, max_blocks, max_positions = n + 2, 4, 4 * block_size
    num_blocks = num_slots * max_blocks + 1
    table = torch.randperm(num_blocks, generator=g)[: num_slots * max_blocks].view(num_slots, max_blocks)
    slots = torch.randperm(num_slots, generator=g)[:n]
    slots[list(padding)] = -1
    positions = torch.randint(0, max_positions, (n,), generator=g)
    cos, sin = tables(max_positions, d)
    qkv = torch.randn(n, (heads + 2 * kv_heads) * d, generator=g) * 3
    sizes = {"none": None, "per_head": (d, d), "full": (heads * d, kv_heads * d)}[norm]
    q_w, k_w = (None, None) if sizes is None else [torch.rand(s, generator=g) + 0.5 for s in sizes]
    cache = lambda: torch.randn(num_blocks, block_size, kv_heads, d, generator=g).to(DEVICE, dtype)
    on = lambda t, dt=None: None if t is None else t.to(DEVICE, dt or t.dtype)
    i32 = lambda t: t.to(DEVICE, torch.int32)
    return dict(qkv=on(qkv, dtype), positions=i32(positions), slots=i32(slots), block_table=i32(table),
                k_cache=cache(), v_cache=cache(), cos=on(cos), sin=on(sin), heads=heads, norm=norm,
                q_norm_w=on(q_w, dtype), k_norm_w=on(k_w, dtype))


def run(case, **kw):
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    args = [case[k] for k in ("qkv", "positions", "slots", "block_table")] + [k_cache, v_cache, case["cos"], case["sin"]]
    q = qk_rope_cache(*args, qk_norm=case["norm"], q_norm_w=case["q_norm_w"], k_norm_w=case["k_norm_w"], eps=EPS, **kw)
    return q, k_cache, v_cache


def check(case):
    dtype = case["qkv"].dtype
    q, k_cache, v_cache = run(case)
    args = [case[k] for k in ("qkv", "positions", "slots", "block_table", "k_cache", "v_cache", "cos",
                              "sin", "heads", "norm", "q_norm_w", "k_norm_w")]
    q_ref, k_ref, v_ref = reference(*args)
    assert torch.equal(v_cache.cpu().double(), v_ref)  # v is copied, every other row untouched
    written = (k_ref != case["k_cache"].cpu().double()).any(-1).any(-1)  # rows a live row wrote
    assert torch.equal(k_cache.cpu().double()[~written], k_ref[~written])
    tol = TOLERANCES[dtype]
    for name, got, exact, plain in (("q", q.cpu().double(), q_ref, None), ("k", k_cache.cpu().double(), k_ref, None)):
        err = (got - exact).abs().max().item()
        if dtype == torch.float32:
            bound = tol["atol"] + tol["rtol"] * exact.abs().max().item()
        else:
            plain = reference(*args, rope_dtype=dtype)[0 if name == "q" else 1].double()
            bound = tol["factor"] * (plain - exact).abs().max().item() + tol["floor"]
        assert err <= bound, f"{name}: max error {err:.3g} > bound {bound:.3g}"
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", ["none", "per_head", "full"])
@pytest.mark.parametrize("n,heads,kv_heads,d,block_size", [
    (1, 2, 2, 16, 16),  # n=1, no GQA
    (3, 4, 1, 32, 32),  # GQA 4, 32-key blocks
    (7, 8, 2, 64, 16),  # n=7, GQA 4 over two kv heads, d=64
])
def test_matches_reference(n, heads, kv_heads, d, block_size, norm, dtype):
    check(make_case(n, heads, kv_heads, d, block_size, dtype, norm, seed=n + d))


def test_head_dim_not_a_power_of_two_and_full_norm_over_several_steps(monkeypatch):
    from pyengine.kernels import qk_rope_cache as mod

    monkeypatch.setattr(mod, "MAX_BLOCK_FULL", 64)  # q projection of 240: four steps
    check(make_case(3, 4, 2, 60, 16, torch.float32, "full", seed=5))


def test_a_window_ring_table_wraps_positions_past_its_blocks():
    """A sliding window of 17 keys over 16-key blocks: a ring table of 3 entries a slot (at least
    ring_blocks(17, 16) = 2); positions
    up to 63 land in entry (p // 16) % 3. Without the window the same call is refused."""
    case = make_case(6, 4, 2, 32, 16, torch.float32, "none", seed=4)
    case["block_table"] = case["block_table"][:, :3].contiguous()
    q, k_cache, v_cache = run(case, window=17)
    assert int(case["positions"].max()) >= 48  # some rows wrap
    ref_table = case["block_table"].cpu().long()
    for i in range(6):
        p, slot = int(case["positions"][i]), int(case["slots"][i])
        block = int(ref_table[slot, (p // 16) % 3])
        v = case["qkv"][i, 6 * 32:].view(2, 32)  # v follows q (4 heads) and k (2 kv heads)
        assert torch.equal(v_cache[block, p % 16], v)
    with pytest.raises(ValueError, match=r"positions \+ 1: live rows span"):
        run(case)


def test_padding_rows_write_nothing_and_give_zero_q():
    case = make_case(5, 4, 2, 32, 16, torch.float16, "per_head", seed=2, padding=(0, 3))
    q = check(case)
    assert bool((q[0] == 0).all()) and bool((q[3] == 0).all())


def test_prepared_call_is_one_launch_into_given_buffers():
    case = make_case(3, 4, 2, 32, 16, torch.float32, "per_head", seed=3)
    prepared = QKRopeCache(8, 4, 2, 32, 16, torch.float32, DEVICE, qk_norm=QKNorm.PER_HEAD)
    q_out = torch.empty(3, 4, 32, device=DEVICE)
    k_cache, v_cache = case["k_cache"].clone(), case["v_cache"].clone()
    with counting() as c:
        got = prepared(case["qkv"], case["positions"], case["slots"], case["block_table"], k_cache,
                       v_cache, case["cos"], case["sin"], q_out, q_norm_w=case["q_norm_w"],
                       k_norm_w=case["k_norm_w"], eps=EPS)
    assert got is q_out and c.triton == 1
    q, k_ref, v_ref = run(case)
    assert torch.equal(q_out, q) and torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("change,exc,match", [
    (dict(qkv=lambda c: c["qkv"][:, :-16]), ValueError, r"qkv: shape \(3, 240\).*must be \[n, \(heads \+ 2 \* 2\) \* 32\]"),
    (dict(positions=lambda c: c["positions"] + 1000), ValueError, r"positions: values span .*max_positions=64"),
    (dict(slots=lambda c: c["slots"].long()), TypeError, r"slots\.dtype=torch\.int64"),
    (dict(cos=lambda c: c["cos"][:, :8].contiguous()), ValueError, r"cos\.shape=\(64, 8\): must be \[max_positions, 16\]"),
    (dict(q_norm_w=lambda c: c["q_norm_w"][:16]), ValueError, r"q_norm_w\.shape=\(16,\): must be \[32\].*'per_head'"),
    (dict(k_cache=lambda c: c["k_cache"].half()), TypeError, r"k_cache\.dtype=torch\.float16"),
    (dict(block_table=lambda c: c["block_table"] + 1000), ValueError, r"block_table\[\d+\]: blocks used by row 0"),
])
def test_bad_input_names_the_argument(change, exc, match):
    case = make_case(3, 4, 2, 32, 16, torch.float32, "per_head", seed=4)
    for key, fn in change.items():
        case[key] = fn(case)
    with pytest.raises(exc, match=match):
        run(case)


def test_bad_norm_settings():
    case = make_case(3, 4, 2, 32, 16, torch.float32, "none", seed=4)
    with pytest.raises(ValueError, match=r"qk_norm='rms': must be one of \['full', 'none', 'per_head'\]"):
        run({**case, "norm": "rms"})
    with pytest.raises(ValueError, match=r"q_norm_w: must be None for qk_norm='none'"):
        run({**case, "q_norm_w": torch.ones(32, device=DEVICE)})
    with pytest.raises(ValueError, match=r"head_dim=31: must be even"):
        QKRopeCache(1, 1, 1, 31, 16, torch.float32, DEVICE)


@pytest.mark.gpu
@pytest.mark.parametrize("norm", ["none", "per_head", "full"])
def test_bf16_decode_shapes_on_gpu(norm):
    check(make_case(64, 32, 8, 128, 16, torch.bfloat16, norm, seed=1, padding=(5,)))
