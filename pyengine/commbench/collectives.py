"""One record per benchmarked collective (the nccl-tests way): buffer counts, the expected
result in closed form, and how to issue it on a transport. Bus factors come from
pyengine.core.collectives, the same numbers the planner uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from pyengine.core.collectives import Collective


def fill_value(rank: int, index: torch.Tensor) -> torch.Tensor:
    """Small integers in [0, 7] (exact in every dtype, sums exact for up to 32 ranks in bf16)."""
    return (index * 3 + rank * 5 + 1) % 8


@dataclass(frozen=True)
class CollectiveTest:
    collective: Collective
    inplace: bool
    """The result lands in the input buffer (all-reduce, broadcast)."""
    redop: str
    """Printed in the redop column ("sum" or "none")."""
    expected: Callable[[int, int, int, int], torch.Tensor]
    """(rank, nranks, root, count_out) -> the exact result this rank must hold."""
    issue: Callable[..., list]
    """(transport, inp, out, root, group, name) -> handles."""
    scatters: bool = False
    """The input holds one chunk per rank (reduce-scatter)."""

    def counts(self, size: int, elt: int, n: int) -> tuple[int, int]:
        """(elements in this rank's input buffer, elements in its output buffer)."""
        count = size // elt
        if self.scatters:
            per = count // n
            return per * n, per
        return count, count


def _sendrecv(tr: Any, inp, out, root: int, group, name: str) -> list:
    n, r = tr.world_size, tr.rank
    # One group: on NCCL a ring of blocking sends would deadlock, and a rank sending to itself
    # needs its send and receive fused (the other transports pass the group through).
    with tr.group():
        return [tr.send(inp, (r + 1) % n, name=name), tr.recv(out, (r - 1) % n, name=name)]


def _sum_of_fills(rank: int, n: int, root: int, count: int) -> torch.Tensor:
    idx = torch.arange(count, dtype=torch.int64)
    return sum(fill_value(r, idx) for r in range(n))


def _scattered_sum(rank: int, n: int, root: int, count: int) -> torch.Tensor:
    idx = torch.arange(count, dtype=torch.int64) + rank * count
    return sum(fill_value(r, idx) for r in range(n))


TESTS: dict[Collective, CollectiveTest] = {
    Collective.ALL_REDUCE: CollectiveTest(
        Collective.ALL_REDUCE, inplace=True, redop="sum", expected=_sum_of_fills,
        issue=lambda tr, inp, out, root, group, name: [tr.all_reduce(inp, group, name=name)]),
    Collective.REDUCE_SCATTER: CollectiveTest(
        Collective.REDUCE_SCATTER, inplace=False, redop="sum", expected=_scattered_sum, scatters=True,
        issue=lambda tr, inp, out, root, group, name: [tr.reduce_scatter(out, inp, group, name=name)]),
    Collective.BROADCAST: CollectiveTest(
        Collective.BROADCAST, inplace=True, redop="none",
        expected=lambda rank, n, root, count: fill_value(root, torch.arange(count, dtype=torch.int64)),
        issue=lambda tr, inp, out, root, group, name: [tr.broadcast(inp, root, group, name=name)]),
    Collective.SENDRECV: CollectiveTest(
        Collective.SENDRECV, inplace=False, redop="none",
        expected=lambda rank, n, root, count: fill_value((rank - 1) % n,
                                                         torch.arange(count, dtype=torch.int64)),
        issue=_sendrecv),
}
"""sendrecv: rank r sends to r+1 and receives from r-1 (mod n)."""

OPS = tuple(c.value for c in TESTS)
