"""The comm harness's closed-form results and buffer counts, written out by hand.

Rank r fills element i with (3i + 5r + 1) mod 8. With 3 ranks the first six elements are
    rank 0: 1 4 7 2 5 0      rank 1: 6 1 4 7 2 5      rank 2: 3 6 1 4 7 2
so the sum over ranks is 10 11 12 13 14 7. If these closed forms were wrong the same way as a
collective, #wrong would read 0 on a broken transport.
"""

import pytest
import torch

from pyengine.commbench.collectives import TESTS, fill_value
from pyengine.core.collectives import Collective


def test_fill_values_by_hand():
    idx = torch.arange(6)
    assert fill_value(0, idx).tolist() == [1, 4, 7, 2, 5, 0]
    assert fill_value(1, idx).tolist() == [6, 1, 4, 7, 2, 5]
    assert fill_value(2, idx).tolist() == [3, 6, 1, 4, 7, 2]


@pytest.mark.parametrize("collective,rank,root,count,want", [
    (Collective.ALL_REDUCE, 1, 0, 4, [10, 11, 12, 13]),  # the sum over the 3 ranks, on every rank
    # reduce-scatter: rank r gets elements [r*count, (r+1)*count) of the sum; count 2 per rank
    (Collective.REDUCE_SCATTER, 0, 0, 2, [10, 11]),
    (Collective.REDUCE_SCATTER, 1, 0, 2, [12, 13]),
    (Collective.REDUCE_SCATTER, 2, 0, 2, [14, 7]),  # elements 4, 5: 5 + 2 + 7 and 0 + 5 + 2
    (Collective.BROADCAST, 0, 2, 4, [3, 6, 1, 4]),  # the root's (rank 2's) fill everywhere
    (Collective.SENDRECV, 0, 0, 4, [3, 6, 1, 4]),  # rank 0 receives from rank 2 = (0 - 1) mod 3
    (Collective.SENDRECV, 2, 0, 4, [6, 1, 4, 7]),  # rank 2 receives from rank 1
])
def test_expected_results_by_hand(collective, rank, root, count, want):
    assert TESTS[collective].expected(rank, 3, root, count).tolist() == want


@pytest.mark.parametrize("collective,size,n,counts", [
    (Collective.ALL_REDUCE, 1000, 3, (250, 250)),  # 1000 bytes of fp32
    (Collective.REDUCE_SCATTER, 1000, 3, (249, 83)),  # 250 elements -> 83 per rank, input 3 x 83
    (Collective.REDUCE_SCATTER, 12, 3, (3, 1)),  # one element per rank
    (Collective.REDUCE_SCATTER, 8, 3, (0, 0)),  # fewer elements than ranks: nothing to run
    (Collective.BROADCAST, 1024, 2, (256, 256)),
    (Collective.SENDRECV, 4, 3, (1, 1)),
])
def test_buffer_counts_by_hand(collective, size, n, counts):
    assert TESTS[collective].counts(size, 4, n) == counts
