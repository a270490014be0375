"""The KV cache of the attention GPU: every layer's keys and values of every sequence, preallocated.

One allocation for all layers ([L, sequences, kv_heads, capacity, d] for K and the same for V),
made once before the first forward; a forward writes its chunks' keys/values at their positions
and attention reads a sequence's first `n` rows as a view, so nothing is allocated per micro-batch
or per decode step. Capacity is the longest sequence a job will reach (prompt + new tokens in
generation); its bytes are in the memory check (`cache_bytes`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyengine.core import dtypes

if TYPE_CHECKING:
    import torch

    from pyengine.core.spec import DeploymentSpec
    from pyengine.model.batch import Segment


def cache_bytes(spec: DeploymentSpec, sequences: int, capacity: int) -> int:
    """Bytes of K and V for every layer, `sequences` sequences of up to `capacity` tokens."""
    m = spec.model
    if not m.layered:
        return 0
    return 2 * m.layers * sequences * m.kv_heads * capacity * m.head_size * dtypes.nbytes(m.dtype)


class KVCache:
    def __init__(self, spec: DeploymentSpec, sequences: int, capacity: int,
                 device: torch.device | str, dtype: torch.dtype):
        import torch

        m = spec.model
        shape = (m.layers, sequences, m.kv_heads, capacity, m.head_size)
        # Zeroed once, not empty: a decode group reads its shorter sequences' rows past their
        # length under a mask, and a masked weight of 0 times a NaN left in fresh memory is NaN.
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.sequences, self.capacity = sequences, capacity

    def fits(self, sequences: int, capacity: int) -> bool:
        return sequences <= self.sequences and capacity <= self.capacity

    def write(self, layer: int, seg: Segment, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [t, kv_heads, d] of segment `seg` (rows of this chunk) at its positions."""
        end = seg.pos + seg.tokens
        if end > self.capacity:
            raise ValueError(f"sequence {seg.seq} reaches position {end}: the KV cache holds "
                             f"{self.capacity} per sequence")
        self.k[layer, seg.seq, :, seg.pos:end] = k.transpose(0, 1)
        self.v[layer, seg.seq, :, seg.pos:end] = v.transpose(0, 1)

    def keys(self, layer: int, seq: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first n cached rows of `seq`: K, V [kv_heads, n, d]."""
        return self.k[layer, seq, :, :n], self.v[layer, seq, :, :n]

    def group(self, layer: int, seqs: tuple[int, ...], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [len(seqs), kv_heads, n, d] of several sequences: a view when they are
        consecutive, else a gather."""
        first = seqs[0]
        if seqs == tuple(range(first, first + len(seqs))):
            return (self.k[layer, first:first + len(seqs), :, :n],
                    self.v[layer, first:first + len(seqs), :, :n])
        import torch

        idx = torch.tensor(seqs).to(self.k.device, non_blocking=True)  # no stream sync (pageable, staged)
        return self.k[layer, idx, :, :n], self.v[layer, idx, :, :n]
