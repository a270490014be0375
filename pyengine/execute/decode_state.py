"""The static state of decode steps: a step is a pure function of persistent buffers.

A decode step of n live sequences in m groups runs the tables of one *shape*: m groups of b rows,
b the smallest bucket (1, 2, 4, ... 256, then multiples of 256) that holds the largest group, so the
live set can grow and shrink without new tables, new buffers or new CUDA graphs. Per shape, the
buffers are allocated once: the ids to embed and each row's position, KV slot and key count, packed
in one int64 tensor that a step fills with one host-to-device copy (from pinned memory on CUDA);
rows past a group's sequences are padding (slot -1: they write the cache's trash block, route to no
expert, and their ids are dropped). Finished sequences leave holes in the slots; nothing is
compacted or copied. The attention rank's chunk tables are views of these buffers (the Triton path)
or are made from them once per step (the torch path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyengine.core.spec import near_even_split
from pyengine.model.batch import Batch

MAX_BUCKET = 256
IDS, POSITIONS, SLOTS, LENGTHS = range(4)


def bucket(rows: int) -> int:
    """The padded row count of a group of `rows` sequences."""
    if rows < 1:
        raise ValueError(f"rows = {rows}: a decode group holds at least one sequence")
    if rows <= MAX_BUCKET:
        return 1 << (rows - 1).bit_length()
    return -(-rows // MAX_BUCKET) * MAX_BUCKET


@dataclass(frozen=True, slots=True)
class DecodeShape:
    groups: int
    rows: int
    """Rows per group (a bucket)."""

    @property
    def total(self) -> int:
        return self.groups * self.rows

    def batch(self) -> Batch:
        """The padded batch whose tables every step of this shape runs (one token per row)."""
        return Batch.decode([1] * self.total, self.groups)


def decode_shape(live: int, micro_batches: int) -> tuple[DecodeShape, list[int]]:
    """The shape of a step of `live` sequences and each group's real row count."""
    m = min(micro_batches, live)
    sizes = near_even_split(live, m)
    return DecodeShape(m, bucket(max(sizes))), sizes


class StaticStep:
    """The persistent buffers of one shape on one rank."""

    def __init__(self, shape: DecodeShape, device: torch.device):
        self.shape, self.device = shape, device
        pin = device.type == "cuda"
        self._host = torch.zeros(4, shape.total, dtype=torch.int64, pin_memory=pin)
        self.packed = torch.zeros(4, shape.total, dtype=torch.int64, device=device)
        self.meta = torch.zeros(3, shape.total, dtype=torch.int32, device=device)
        """[positions, slots, lengths] int32: what the kernels read."""
        self.rows_of: list[int] = []
        """The padded row of each sequence of the last step, in the step's order."""

    @property
    def ids(self) -> torch.Tensor:
        return self.packed[IDS]

    def write(self, ids: list[int], slots: list[int], positions: list[int], sizes: list[int]) -> None:
        """Fill the buffers for one step: sequence i (in order) goes to its group's next row."""
        b, total = self.shape.rows, self.shape.total
        rows = [r for g, n in enumerate(sizes) for r in range(g * b, g * b + n)]
        values = [[0] * total, [0] * total, [-1] * total, [0] * total]
        for i, r in enumerate(rows):
            values[IDS][r], values[POSITIONS][r], values[SLOTS][r] = ids[i], positions[i], slots[i]
            values[LENGTHS][r] = positions[i] + 1
        host = self._host
        host.copy_(torch.tensor(values, dtype=torch.int64))
        # From pinned memory on CUDA: asynchronous, ordered on the current stream, no host sync.
        # The host buffer is rewritten only by the next step, after this one's ids reached the host.
        self.packed.copy_(host, non_blocking=True)
        self.meta.copy_(self.packed[POSITIONS:])
        self.rows_of = rows

    def group_meta(self, g: int) -> torch.Tensor:
        b = self.shape.rows
        return self.meta[:, g * b:(g + 1) * b]
