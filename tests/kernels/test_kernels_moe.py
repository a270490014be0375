"""MoE expert-shard kernels vs a plain per-expert reference.

CPU: Triton interpreter, fp32/fp16, tiny odd shapes with 16-wide tiles (the CPU config).
GPU (`-m gpu`): bf16 at the seed shapes. The interpreter's bf16 tl.dot is wrong in Triton
3.9, so bf16 runs only there.
"""

import pytest
import torch
import torch.nn.functional as Fn

from pyengine.kernels.moe_align import moe_align_block_size

from pyengine.kernels.moe_expert_shard import moe_expert_shard

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# fp32: absolute + relative bound. Low precision: kernel error vs the fp32 reference may be
# at most `factor` x plain torch's error in the same dtype, plus a small absolute floor
# (tiny shapes can make torch's own error ~0).
TOLERANCES = {
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(factor=2.0, floor=2e-4),
    torch.bfloat16: dict(factor=2.0, floor=1e-2),
}


def reference_moe(u, w_gate, w_up, w_down, topk_ids, topk_weights, activation="swiglu"):
    """The obvious way: loop over experts, gather their tokens, compute in u's dtype."""
    y = torch.zeros(u.shape, device=u.device, dtype=torch.float32)
    for e in range(w_up.shape[0]):
        tok, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        x = u[tok]
        if activation == "swiglu":
            act = Fn.silu(x @ w_gate[e]) * (x @ w_up[e])
        else:
            act = Fn.gelu(x @ w_up[e])
        out = (act @ w_down[e]).float() * topk_weights[tok, slot, None].float()
        y.index_add_(0, tok, out)
    return y.to(u.dtype)


def make_inputs(T, E, k, H, F, routing, dtype, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(T, H, generator=g)
    w_gate = torch.randn(E, H, F, generator=g) / H ** 0.5
    w_up = torch.randn(E, H, F, generator=g) / H ** 0.5
    w_down = torch.randn(E, F, H, generator=g) / F ** 0.5
    ids = torch.rand(T, E, generator=g).argsort(dim=1)[:, :k]  # k distinct experts per token
    if routing == "skip_last":  # expert E-1 gets no tokens
        ids = torch.rand(T, E - 1, generator=g).argsort(dim=1)[:, :k]
    elif routing == "one_expert":  # every token on expert E-1 (k=1)
        ids = torch.full((T, k), E - 1)
    weights = torch.softmax(torch.randn(T, k, generator=g), dim=1)
    cast = lambda t: t.to(device=device, dtype=dtype)
    return (cast(u), cast(w_gate), cast(w_up), cast(w_down),
            ids.to(device=device, dtype=torch.int32), weights.to(device))


def check_close(out, inputs, activation="swiglu"):
    """Kernel output vs fp32 reference, by TOLERANCES[dtype]."""
    dtype = out.dtype
    ref32 = reference_moe(*[t.float() if t is not None and t.is_floating_point() else t for t in inputs],
                          activation=activation)
    err = (out.float() - ref32).abs().max().item()
    tol = TOLERANCES[dtype]
    if dtype == torch.float32:
        bound = tol["atol"] + tol["rtol"] * ref32.abs().max().item()
    else:
        torch_err = (reference_moe(*inputs, activation=activation).float() - ref32).abs().max().item()
        bound = tol["factor"] * torch_err + tol["floor"] * max(1.0, ref32.abs().max().item())
    assert err <= bound, f"max error {err:.3g} > bound {bound:.3g}"


SHAPES = [  # (T, E, k, H, F_r, routing)
    pytest.param(1, 1, 1, 24, 17, "random", id="T=1,E=1,prime F"),
    pytest.param(7, 3, 2, 40, 29, "random", id="H,F not multiples of 16"),
    pytest.param(37, 5, 3, 24, 13, "random", id="k=3,F<BLOCK_N,many row tiles"),
    pytest.param(37, 5, 2, 17, 16, "skip_last", id="expert with no tokens,prime H"),
    pytest.param(37, 3, 1, 40, 17, "one_expert", id="all tokens on one expert"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,k,H,F,routing", SHAPES)
def test_shard_matches_reference(T, E, k, H, F, routing, dtype):
    inputs = make_inputs(T, E, k, H, F, routing, dtype)
    out = moe_expert_shard(*inputs)
    assert out.shape == (T, H) and out.dtype == dtype
    check_close(out, inputs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gelu_variant(dtype):  # no gate: gelu(u @ w_up[e])
    u, _, w_up, w_down, ids, w = make_inputs(7, 3, 2, 40, 29, "random", dtype)
    out = moe_expert_shard(u, None, w_up, w_down, ids, w, activation="gelu")
    check_close(out, (u, None, w_up, w_down, ids, w), activation="gelu")


def test_uneven_shards_sum_to_full():  # F=29 split 13 + 16
    u, wg, wu, wd, ids, w = make_inputs(37, 5, 2, 24, 29, "random", torch.float32)
    parts = [moe_expert_shard(u, wg[..., s], wu[..., s], wd[:, s], ids, w)
             for s in (slice(0, 13), slice(13, 29))]
    ref = reference_moe(u, wg, wu, wd, ids, w)
    torch.testing.assert_close(parts[0] + parts[1], ref, atol=2e-5, rtol=2e-5)


def test_pinned_config_smaller_column_tile(monkeypatch):
    # Column tile 16 inside a 32-row alignment (all-padding sub-tiles are skipped); BLOCK_K=32
    # with H=40 and F=29 leaves ragged K tails in both GEMMs.
    monkeypatch.setenv("PYENGINE_MOE_COLUMN_CONFIG",
                       "BLOCK_M=16,BLOCK_N=16,BLOCK_K=32,GROUP_M=3,num_warps=1,num_stages=1")
    monkeypatch.setenv("PYENGINE_MOE_ROW_CONFIG",
                       "BLOCK_M=32,BLOCK_N=32,BLOCK_K=32,GROUP_M=1,num_warps=1,num_stages=1")
    inputs = make_inputs(37, 5, 2, 40, 29, "random", torch.float32)
    check_close(moe_expert_shard(*inputs), inputs)


def test_strided_inputs():  # u a column slice, weights transposed views, int64 ids
    u, wg, wu, wd, ids, w = make_inputs(7, 3, 2, 24, 17, "random", torch.float32)
    wide = torch.cat([u, u], dim=1)[:, :24]
    wg_t, wu_t = wg.transpose(1, 2).contiguous().transpose(1, 2), wu.transpose(1, 2).contiguous().transpose(1, 2)
    wd_t = wd.transpose(1, 2).contiguous().transpose(1, 2)
    out = moe_expert_shard(wide, wg_t, wu_t, wd_t, ids.long(), w.t().contiguous().t())
    torch.testing.assert_close(out, reference_moe(u, wg, wu, wd, ids, w), atol=2e-5, rtol=2e-5)


def test_deterministic_runs_bitwise_equal_and_atomics_close():
    inputs = make_inputs(37, 5, 3, 24, 29, "random", torch.float16)
    a, b = moe_expert_shard(*inputs), moe_expert_shard(*inputs)
    assert torch.equal(a, b)
    atomic = moe_expert_shard(*inputs, deterministic=False)
    torch.testing.assert_close(atomic, a, atol=2e-3, rtol=2e-3)


def test_zero_tokens():
    u, wg, wu, wd, ids, w = make_inputs(1, 3, 2, 24, 17, "random", torch.float32)
    out = moe_expert_shard(u[:0], wg, wu, wd, ids[:0], w[:0])
    assert out.shape == (0, 24) and out.dtype == torch.float32


# ---- align invariants -----------------------------------------------------------------
@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("T,E,k,routing", [
    (1, 1, 1, "random"),  # T=1
    (37, 5, 3, "random"),  # runs of several blocks
    (37, 5, 2, "skip_last"),  # expert with no tokens
    (37, 3, 1, "one_expert"),  # all tokens on one expert
])
def test_align_invariants(T, E, k, routing, block_m):
    ids = make_inputs(T, E, k, 4, 4, routing, torch.float32)[4]
    al = moe_align_block_size(ids, E, block_m)
    sorted_ids, expert_ids = al.sorted_ids.cpu(), al.expert_ids.cpu()
    counts, n_pad, sentinel = al.expert_counts.cpu(), int(al.num_padded), T * k
    flat = ids.reshape(-1).cpu().long()
    assert torch.equal(counts.long(), torch.bincount(flat, minlength=E))
    assert int(counts.sum()) == T * k
    assert n_pad == int(((counts + block_m - 1) // block_m * block_m).sum())
    used = sorted_ids[:n_pad]
    real = used[used != sentinel].long()
    assert torch.equal(real.sort().values, torch.arange(T * k))  # a permutation of the pairs
    assert bool((sorted_ids[n_pad:] == sentinel).all())  # tail: only sentinels
    assert bool((expert_ids[n_pad // block_m:] == -1).all())
    for b in range(n_pad // block_m):
        e = int(expert_ids[b])
        rows = used[b * block_m:(b + 1) * block_m]
        pairs = rows[rows != sentinel].long()
        assert 0 <= e < E and pairs.numel() > 0  # one expert per block, no empty block
        assert bool((flat[pairs] == e).all())
        assert torch.equal(pairs, pairs.sort().values)  # stable: token order kept
        # padding only after the expert's real rows
        assert bool((rows[:pairs.numel()] != sentinel).all())
    assert torch.equal(moe_align_block_size(ids, E, block_m).sorted_ids, al.sorted_ids)


# ---- bad input ------------------------------------------------------------------------
def _bad(name):
    u, wg, wu, wd, ids, w = make_inputs(7, 3, 2, 24, 17, "random", torch.float32)
    d = dict(u=u, w_gate=wg, w_up=wu, w_down=wd, topk_ids=ids, topk_weights=w)
    meta = lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta")
    cases = {
        "u 3-D": (dict(u=u[None]), ValueError, r"u\.shape=.*2 dims"),
        "w_up H mismatch": (dict(w_up=wu[:, :20]), ValueError, r"w_up\.shape=.*H = u\.shape\[1\]"),
        "w_gate shape": (dict(w_gate=wg[..., :16]), ValueError, r"w_gate\.shape=.*w_up\.shape"),
        "w_down shape": (dict(w_down=wd[:, :16]), ValueError, r"w_down\.shape=.*\[E, F_r, H\]"),
        "topk_ids T": (dict(topk_ids=ids[:3]), ValueError, r"topk_ids\.shape=.*T = u\.shape\[0\]"),
        "topk_weights shape": (dict(topk_weights=w[:, :1]), ValueError, r"topk_weights\.shape="),
        "k > E": (dict(topk_ids=ids.repeat(1, 2), topk_weights=w.repeat(1, 2)), ValueError, r"top-k must be <= E=3"),
        "id = E": (dict(topk_ids=ids.clone().fill_(3)), ValueError, r"topk_ids: values span \[3, 3\].*\[0, E=3\)"),
        "id < 0": (dict(topk_ids=ids.clone().fill_(-1)), ValueError, r"topk_ids: values span \[-1, -1\]"),
        "weight dtype": (dict(w_down=wd.half()), TypeError, r"w_down\.dtype=torch\.float16: must equal u\.dtype"),
        "u int": (dict(u=u.long()), TypeError, r"u\.dtype=torch\.int64"),
        "ids float": (dict(topk_ids=ids.float()), TypeError, r"topk_ids\.dtype=torch\.float32"),
        "weights int": (dict(topk_weights=w.long()), TypeError, r"topk_weights\.dtype=torch\.int64"),
        "not a tensor": (dict(u=u.tolist()), TypeError, r"u: got list"),
        "device": (dict(w_down=meta(wd)), ValueError, r"w_down\.device=meta: must equal u\.device"),
        "gate strides": (dict(w_gate=wg.transpose(1, 2).contiguous().transpose(1, 2)), ValueError, r"w_gate\.stride\(\)="),
    }
    changes, exc, match = cases[name]
    d.update(changes)
    return d, exc, match


@pytest.mark.parametrize("name", ["u 3-D", "w_up H mismatch", "w_gate shape", "w_down shape",
                                  "topk_ids T", "topk_weights shape", "k > E", "id = E", "id < 0",
                                  "weight dtype", "u int", "ids float", "weights int",
                                  "not a tensor", "device", "gate strides"])
def test_bad_input_names_argument(name):
    kwargs, exc, match = _bad(name)
    with pytest.raises(exc, match=match):
        moe_expert_shard(**kwargs)


def test_bad_activation_and_gelu_gate():
    u, wg, wu, wd, ids, w = make_inputs(7, 3, 2, 24, 17, "random", torch.float32)
    with pytest.raises(ValueError, match=r"activation='relu': must be one of"):
        moe_expert_shard(u, wg, wu, wd, ids, w, activation="relu")
    with pytest.raises(ValueError, match=r"w_gate: must be None for activation='gelu'"):
        moe_expert_shard(u, wg, wu, wd, ids, w, activation="gelu")
    with pytest.raises(ValueError, match=r"block_m=24: must be a power of two"):
        moe_align_block_size(ids, 3, 24)


# ---- GPU: bf16 at the seed shapes ------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("T", [256, 1024])
def test_seed_shapes_bf16(T):
    E, k, H, F = 8, 2, 4096, 7168  # seed: H=4096, F=14336 at TP 2 -> F_r=7168
    inputs = make_inputs(T, E, k, H, F, "random", torch.bfloat16, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 reference in true fp32
    out = moe_expert_shard(*inputs)
    check_close(out, inputs)
    atomic = moe_expert_shard(*inputs, deterministic=False)
    # both round one fp32 sum to bf16; only the add order of the k rows differs
    torch.testing.assert_close(atomic, out, atol=1e-2, rtol=1e-2)
    assert torch.equal(moe_expert_shard(*inputs), out)


def test_launchers_autotune_path():  # config=None goes through triton.autotune
    from pyengine.kernels import moe_column_swiglu as col, moe_row_down as row, tuning

    u, wg, wu, wd, ids, w = make_inputs(7, 3, 2, 24, 17, "random", torch.float32)
    al = moe_align_block_size(ids, 3, 16)
    a = col.moe_column_swiglu(u, wg, wu, al, 2, config=None)
    y = row.moe_row_down(a, wd, w, al, 2, config=None)
    y_atomic = row.moe_row_down(a, wd, w, al, 2, deterministic=False, config=None)
    ref = reference_moe(u, wg, wu, wd, ids, w)
    torch.testing.assert_close(y, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(y_atomic, ref, atol=2e-5, rtol=2e-5)
    gpu = tuning.moe_configs("row", torch.device("cuda"))
    kept = row._prune(gpu, {"a_ptr": a}, ALIGN_M=32)  # CPU tensor: only the alignment rule
    assert kept and all(32 % c.kwargs["BLOCK_M"] == 0 for c in kept) and len(kept) < len(gpu)
