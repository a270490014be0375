"""The single-launch align kernel gives exactly the results of the torch alignment it replaced.

The reference below is that torch version (~15 launches): a stable sort of the expert ids,
searchsorted for run bounds, cumsum for offsets and one scatter. Every output buffer must be
equal element for element: sorted_ids (token order within an expert, sentinel T*k padding),
expert_ids (-1 past num_padded), expert_counts and num_padded.
"""

import pytest
import torch

from pyengine.kernels.launch_count import counting
from pyengine.kernels.moe_align import (alignment_view, empty_alignment, moe_align_block_size,
                                        moe_align_config, _moe_align_block_size)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def reference_align(topk_ids: torch.Tensor, E: int, block_m: int):
    """(sorted_ids, expert_ids, expert_counts, num_padded) the torch way."""
    flat = topk_ids.reshape(-1).cpu().long()
    num_pairs = flat.numel()
    key = torch.where(flat < 0, E, flat)  # left-out pairs sort after every expert
    experts_sorted, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(experts_sorted, torch.arange(E + 1))
    counts = bounds[1:] - bounds[:-1]
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    rows = (num_pairs + min(E, num_pairs) * (block_m - 1)) // block_m * block_m
    sorted_ids = torch.full((rows,), num_pairs, dtype=torch.long)
    real = experts_sorted < E
    e, i = experts_sorted[real], torch.arange(num_pairs)[real]
    sorted_ids[(padded_end - padded)[e] + i - bounds[e]] = order[real]  # run start + rank
    block_start = torch.arange(rows // block_m) * block_m
    owner = torch.searchsorted(padded_end, block_start, right=True)
    expert_ids = torch.where(owner < E, owner, -1)
    return sorted_ids, expert_ids, counts, padded_end[-1:]


def check_equal(al, topk_ids, E, block_m):
    want = reference_align(topk_ids, E, block_m)
    got = (al.sorted_ids, al.expert_ids, al.expert_counts, al.num_padded)
    for name, g, w in zip(("sorted_ids", "expert_ids", "expert_counts", "num_padded"), got, want):
        assert g.dtype == torch.int32, name
        assert torch.equal(g.cpu().long(), w), f"{name}: {g.cpu().tolist()} != {w.tolist()}"


def random_ids(T, k, E, seed, left_out=0.0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, E, (T, k), generator=g)
    ids[torch.rand(T, k, generator=g) < left_out] = -1
    return ids.to(torch.int32)


@pytest.mark.parametrize("block_m", [1, 16, 64, 256])
@pytest.mark.parametrize("T,k,E,left_out", [
    (1, 1, 1, 0.0),  # T=1, one expert
    (1, 8, 256, 0.0),  # decode: one token, E of DeepSeek-V3
    (7, 2, 3, 0.0),  # runs shorter than block_m
    (37, 3, 5, 0.3),  # left-out pairs mixed in
    (60, 4, 60, 0.1),  # E not a power of two, E_PAD = 64 holds no spare bin: 128
    (300, 2, 8, 0.0),  # 600 pairs: several chunks (256 on CPU)
])
def test_align_equals_the_torch_alignment(T, k, E, left_out, block_m):
    ids = random_ids(T, k, E, seed=T * k + E, left_out=left_out).to(DEVICE)
    check_equal(moe_align_block_size(ids, E, block_m), ids, E, block_m)


def test_int64_ids_and_a_skewed_load():
    ids = torch.zeros(50, 2, dtype=torch.int64)
    ids[:, 1] = 3  # two experts take everything, the others nothing
    ids[10:20, 0] = -1
    check_equal(moe_align_block_size(ids.to(DEVICE), 4, 16), ids, 4, 16)


def test_every_pair_left_out_and_no_pairs():
    ids = torch.full((5, 2), -1, dtype=torch.int32)
    check_equal(moe_align_block_size(ids.to(DEVICE), 3, 4), ids, 3, 4)
    empty = torch.zeros(0, 2, dtype=torch.int32, device=DEVICE)
    al = moe_align_block_size(empty, 3, 4)
    assert al.sorted_ids.numel() == 0 and int(al.num_padded) == 0
    assert al.expert_counts.cpu().tolist() == [0, 0, 0]


def test_out_of_range_ids_are_left_out_never_written_past_the_buffers():
    ids = torch.tensor([[0, 7], [1, 3]], dtype=torch.int32)  # E=3: 7 and 3 are out of range
    al = moe_align_block_size(ids.to(DEVICE), 3, 1)
    assert al.expert_counts.cpu().tolist() == [1, 1, 0]
    assert al.sorted_ids.cpu()[: int(al.num_padded)].tolist() == [0, 2]


def test_one_launch_into_views_of_larger_buffers():
    """A prepared caller keeps buffers for its largest count and aligns smaller ones into
    their leading part: one launch, and the part past the view is untouched."""
    buffers = empty_alignment(40 * 2, 5, 16, torch.device(DEVICE))
    buffers.sorted_ids.fill_(-7)
    ids = random_ids(9, 2, 5, seed=3).to(DEVICE)
    view = alignment_view(buffers, ids.numel())
    assert view.sorted_ids.data_ptr() == buffers.sorted_ids.data_ptr()
    with counting() as c:
        _moe_align_block_size(ids, 5, 16, view)
    assert c.triton == 1
    check_equal(view, ids, 5, 16)
    assert bool((buffers.sorted_ids[view.sorted_ids.numel():] == -7).all())


def test_chunk_size_and_warps_follow_the_static_shape():
    assert moe_align_config(2, 8, 16)["BLOCK_PAIRS"] == 16
    assert moe_align_config(65536, 256, 256) == dict(ALIGN_M=256, E_PAD=512, BLOCK_PAIRS=1024,
                                                     PAD_TILE=8192, num_warps=8)
    assert moe_align_config(65536, 256, 1, on_cpu=True)["BLOCK_PAIRS"] == 256


def test_planted_bug_is_caught():
    """The reference is strict: a swap of two pairs of one expert (order not stable) fails."""
    ids = random_ids(20, 2, 3, seed=5).to(DEVICE)
    al = moe_align_block_size(ids, 3, 4)
    run = al.sorted_ids[:2].clone()
    al.sorted_ids[:2] = run.flip(0)
    with pytest.raises(AssertionError, match="sorted_ids"):
        check_equal(al, ids, 3, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("T,k,E,block_m", [(8192, 8, 256, 64), (4096, 2, 8, 16), (1, 8, 256, 16)])
def test_prefill_sizes_on_gpu(T, k, E, block_m):
    ids = random_ids(T, k, E, seed=1, left_out=0.05).cuda()
    check_equal(moe_align_block_size(ids, E, block_m), ids, E, block_m)
