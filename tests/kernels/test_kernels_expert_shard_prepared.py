"""The prepared expert shard (ExpertShard) and the launch counter every launcher reports to.

A prepared call is at most 4 Triton launches (align, column, row, k-sum), reads no config
file and moves no buffer once its token count fits; its numbers are those of the per-expert
reference (the same reference and tolerances as test_kernels_moe).
"""

import threading

import pytest
import torch

from pyengine.kernels import tuning
from pyengine.kernels.launch_count import counting, count_launch
from pyengine.kernels.moe_expert_shard import ExpertShard, moe_expert_shard
from pyengine.kernels.moe_sum_pairs import moe_sum_pairs
from pyengine.kernels.residual_rmsnorm import fused_residual_rmsnorm
from test_kernels_moe import DEVICE, check_close, make_inputs
from test_kernels_skip_ids import reference as reference_skip, with_held_elsewhere


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,k,H,F", [
    (1, 3, 2, 24, 17),  # T=1 decode
    (7, 5, 3, 40, 29),  # H, F not multiples of 16
])
def test_prepared_call_matches_reference_in_four_launches(T, E, k, H, F, dtype):
    inputs = make_inputs(T, E, k, H, F, "random", dtype, seed=T)
    shard = ExpertShard(E, H, F, k, dtype, DEVICE)
    shard.check(*inputs)
    with counting() as c:
        out = shard(*inputs)
    assert c.triton == 4
    assert out.shape == (T, H) and out.dtype == dtype
    check_close(out, inputs)
    assert torch.equal(out, moe_expert_shard(*inputs))  # the validating path is the same code


def test_out_variant_and_buffers_that_do_not_move():
    shard = ExpertShard(5, 24, 13, 2, torch.float32, DEVICE)
    shard.reserve(16)
    ptrs = lambda: [t.data_ptr() for s in shard._scratch.values() for t in (s.align.sorted_ids, s.a, s.per_pair)]
    before = ptrs()
    for T in (16, 3, 9, 1):
        inputs = make_inputs(T, 5, 2, 24, 13, "random", torch.float32, seed=T)
        out = torch.empty(T, 24, device=DEVICE)
        assert shard(*inputs, out=out) is out
        check_close(out, inputs)
        assert ptrs() == before


def test_configs_are_picked_once_per_bucket(monkeypatch):
    calls = []
    real = tuning.select_config
    monkeypatch.setattr(tuning, "select_config", lambda op, **kw: calls.append(kw["num_tokens"]) or real(op, **kw))
    shard = ExpertShard(3, 24, 17, 2, torch.float32, DEVICE)
    for T in (2, 2, 2, 5):
        shard(*make_inputs(T, 3, 2, 24, 17, "random", torch.float32))
    assert calls == [2, 2, 5, 5]  # column and row, once per distinct decode count
    assert shard.plan(100) is shard.plan(120)  # above the decode counts: one per m_bucket


def test_skip_ids_needs_no_zero_fill():
    """Pairs held elsewhere are never written by the row GEMM; the k-sum skips them, so stale
    rows from an earlier call cannot leak in."""
    T, E, k, H, F = 9, 5, 2, 24, 13
    shard = ExpertShard(E, H, F, k, torch.float32, DEVICE, skip_ids=True)
    u, wg, wu, wd, ids, w = make_inputs(T, E, k, H, F, "random", torch.float32, seed=4)
    shard(u, wg, wu, wd, ids, w)  # fills per_pair with this call's rows
    held = with_held_elsewhere(ids, seed=2)
    with counting() as c:
        out = shard(u, wg, wu, wd, held, w)
    assert c.triton == 4
    ref = reference_skip(u, wg, wu, wd, held, w)
    assert bool((out[0] == 0).all())
    assert float((out.cpu() - ref).abs().max()) <= 2e-5 * max(1.0, float(ref.abs().max()))


def test_gelu_and_atomic_modes():
    u, _, wu, wd, ids, w = make_inputs(7, 3, 2, 40, 29, "random", torch.float32)
    gelu = ExpertShard(3, 40, 29, 2, torch.float32, DEVICE, activation="gelu")
    check_close(gelu(u, None, wu, wd, ids, w), (u, None, wu, wd, ids, w), activation="gelu")
    inputs = make_inputs(7, 3, 2, 40, 29, "random", torch.float32)
    atomic = ExpertShard(3, 40, 29, 2, torch.float32, DEVICE, deterministic=False)
    with counting() as c:
        out = atomic(*inputs)
    assert c.triton == 3  # align, column, row (+ a torch zero fill and cast)
    check_close(out, inputs)


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((0, 24, 17, 2), {}, ValueError, r"E=0: must be an int >= 1"),
    ((3, 24, 17, 4), {}, ValueError, r"top_k=4: must be <= E=3"),
    ((3, 24, 17, 2), dict(activation="relu"), ValueError, r"activation='relu'"),
])
def test_bad_prepared_shapes_name_the_field(args, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        ExpertShard(*args, torch.float32, DEVICE, **kwargs)
    with pytest.raises(TypeError, match=r"dtype=torch.int32: must be one of"):
        ExpertShard(3, 24, 17, 2, torch.int32, DEVICE)


def test_check_names_a_mismatch_with_the_prepared_shard():
    shard = ExpertShard(3, 24, 17, 2, torch.float32, DEVICE)
    u, wg, wu, wd, ids, w = make_inputs(7, 3, 2, 24, 16, "random", torch.float32)
    with pytest.raises(ValueError, match=r"F=16 \(from the arguments' shapes\): must equal the prepared F=17"):
        shard.check(u, wg, wu, wd, ids, w)
    u, wg, wu, wd, ids, w = make_inputs(7, 3, 2, 24, 17, "random", torch.float32)
    with pytest.raises(ValueError, match=r"topk_ids.stride\(\)=\(1, 7\): must be contiguous"):
        shard.check(u, wg, wu, wd, ids.t().contiguous().t(), w)


# ---- the counter -------------------------------------------------------------------------
def test_counter_is_per_thread_and_nests():
    seen = {}

    def other():
        with counting() as c:
            count_launch(5)
        seen["other"] = c.triton

    with counting() as outer:
        count_launch()
        with counting() as inner:
            count_launch(2)
        t = threading.Thread(target=other)
        t.start()
        t.join()
    count_launch()  # outside any block: counted nowhere
    assert (outer.triton, inner.triton, seen["other"]) == (3, 2, 5)


def test_residual_rmsnorm_counts_its_launch():
    x = torch.randn(3, 40, device=DEVICE)
    with counting() as c:
        fused_residual_rmsnorm(x, [x], torch.ones(40, device=DEVICE))
    assert c.triton == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sum_pairs_adds_k_rows_in_order_and_skips_held_elsewhere(dtype):
    g = torch.Generator().manual_seed(0)
    T, k, H = 5, 3, 1100  # H over one 1024-wide tile
    per_pair = torch.randn(T * k, H, generator=g).to(DEVICE)
    ids = torch.randint(0, 4, (T, k), generator=g, dtype=torch.int32)
    ids[1, 2] = ids[3, 0] = -1
    per_pair[T * k - 1 - 9] = float("nan")  # pair (1, 2): held elsewhere, never read
    per_pair[9] = float("nan")  # pair (3, 0)
    out = moe_sum_pairs(per_pair, ids.to(DEVICE), dtype, skip_ids=True)
    rows = per_pair.cpu().view(T, k, H) * (ids >= 0)[:, :, None].float()
    want = torch.nan_to_num(rows, nan=0.0).sum(1)  # fp32 sum, rounded once
    assert out.dtype == dtype
    torch.testing.assert_close(out.cpu(), want.to(dtype), atol=1e-6, rtol=1e-6 if dtype == torch.float32 else 1e-3)
    with pytest.raises(ValueError, match=r"topk_ids.shape=\(5, 2\): must be \[T, k\] with T\*k = per_pair.shape\[0\] = 15"):
        moe_sum_pairs(per_pair, ids[:, :2].to(DEVICE), dtype)
