"""Choices held by another GPU (expert parallel: topk id -1) are left out on the device: the
alignment puts them in no run and no count, the kernels add nothing for them, and a token with
no choice here gets a zero row. Interpreter on CPU (fp32/fp16), the reference written inline."""

import pytest
import torch
import torch.nn.functional as Fn

from pyengine.kernels.moe_align import moe_align_block_size

from pyengine.kernels.moe_expert_shard import moe_expert_shard
from test_kernels_moe import DEVICE, make_inputs


def with_held_elsewhere(ids: torch.Tensor, seed: int, share: float = 0.5) -> torch.Tensor:
    """ids with about `share` of the choices set to -1, token 0's all of them (a zero row)."""
    g = torch.Generator().manual_seed(seed)
    out = ids.clone()
    out[torch.rand(ids.shape, generator=g).to(ids.device) < share] = -1
    out[0] = -1
    return out


def reference(u, w_gate, w_up, w_down, ids, weights):
    """Per token, per choice held here (id >= 0): w * (silu(u W_g) * (u W_u)) W_d, summed in fp32."""
    y = torch.zeros(u.shape, dtype=torch.float32)
    u, ids, weights = u.float().cpu(), ids.cpu(), weights.float().cpu()
    for t in range(u.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e >= 0:
                x = u[t]
                a = Fn.silu(x @ w_gate[e].float().cpu()) * (x @ w_up[e].float().cpu())
                y[t] += weights[t, j] * (a @ w_down[e].float().cpu())
    return y


@pytest.mark.parametrize("block_m", [1, 16])
def test_align_leaves_the_held_elsewhere_pairs_out(block_m):
    ids = with_held_elsewhere(make_inputs(23, 5, 3, 4, 4, "random", torch.float32)[4], seed=1)
    al = moe_align_block_size(ids, 5, block_m)
    flat = ids.reshape(-1).cpu().long()
    here = torch.nonzero(flat >= 0).flatten()
    assert 0 < here.numel() < flat.numel()
    assert torch.equal(al.expert_counts.cpu().long(), torch.bincount(flat[here], minlength=5))
    used = al.sorted_ids.cpu()[: int(al.num_padded)].long()
    real = used[used != flat.numel()]
    assert torch.equal(real.sort().values, here)  # exactly the pairs held here, once each
    for b in range(int(al.num_padded) // block_m):  # every block still holds one expert's pairs
        rows = used[b * block_m:(b + 1) * block_m]
        assert bool((flat[rows[rows != flat.numel()]] == int(al.expert_ids[b])).all())


def test_align_when_row_zero_is_a_real_pair():
    """Left-out pairs write the sentinel to row 0 under a min: a real pair there must survive."""
    ids = torch.tensor([[0, -1], [-1, -1], [0, 1]], dtype=torch.int32, device=DEVICE)
    al = moe_align_block_size(ids, 2, 1)
    assert al.sorted_ids.cpu()[: int(al.num_padded)].tolist() == [0, 4, 5]


def test_align_with_every_pair_elsewhere():
    al = moe_align_block_size(torch.full((4, 2), -1, dtype=torch.int32, device=DEVICE), 3, 16)
    assert int(al.num_padded) == 0 and int(al.expert_counts.sum()) == 0
    assert bool((al.expert_ids.cpu() == -1).all())


@pytest.mark.parametrize("deterministic", [True, False])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("T,E,k,H,F", [(19, 5, 2, 24, 13), (7, 3, 3, 40, 29)])
def test_shard_adds_nothing_for_held_elsewhere(T, E, k, H, F, dtype, tol, deterministic):
    u, wg, wu, wd, ids, w = make_inputs(T, E, k, H, F, "random", dtype, seed=T)
    ids = with_held_elsewhere(ids, seed=T)
    out = moe_expert_shard(u, wg, wu, wd, ids, w, skip_ids=True, deterministic=deterministic)
    ref = reference(u, wg, wu, wd, ids, w)
    assert out.shape == (T, H) and out.dtype == dtype
    assert bool((out[0] == 0).all())  # token 0 has no choice here
    err = float((out.float().cpu() - ref).abs().max())
    assert err <= tol * max(1.0, float(ref.abs().max())), err


def test_minus_one_needs_skip_ids_and_nothing_below_it_passes():
    u, wg, wu, wd, ids, w = make_inputs(7, 3, 2, 24, 17, "random", torch.float32)
    ids[1, 0] = -1
    with pytest.raises(ValueError, match=r"values span \[-1, 2\]; must lie in \[0, E=3\)"):
        moe_expert_shard(u, wg, wu, wd, ids, w)
    ids[1, 0] = -2
    with pytest.raises(ValueError, match=r"must lie in -1 \(skipped\) or \[0, E=3\)"):
        moe_expert_shard(u, wg, wu, wd, ids, w, skip_ids=True)


def test_more_choices_than_local_experts_with_skip_ids():
    """Expert parallel: a GPU holding 1 expert sees top-2 rows (the other choice is -1 here)."""
    u, wg, wu, wd, ids, w = make_inputs(9, 1, 1, 24, 17, "random", torch.float32)
    ids = torch.stack([torch.zeros(9, dtype=torch.int32), torch.full((9,), -1, dtype=torch.int32)], 1)
    ids[::2] = ids[::2].flip(1)  # the local choice in either slot
    w = torch.softmax(torch.randn(9, 2, generator=torch.Generator().manual_seed(2)), 1)
    out = moe_expert_shard(u, wg, wu, wd, ids.to(DEVICE), w.to(DEVICE), skip_ids=True)
    ref = reference(u, wg, wu, wd, ids, w)
    assert float((out.cpu() - ref).abs().max()) <= 2e-5 * max(1.0, float(ref.abs().max()))
    with pytest.raises(ValueError, match="top-k must be <= E=1"):
        moe_expert_shard(u, wg, wu, wd, ids.clamp(min=0).to(DEVICE), w.to(DEVICE))
