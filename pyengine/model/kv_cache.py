"""The KV cache of the attention GPU: paged (fixed-size blocks, a block table per slot), allocated once.

Keys and values of every layer live in one allocation each, `[L, blocks + 1, block_size, kv_heads, d]`
(MLA: the latent rows in the first, `[L, blocks + 1, block_size, 1, kv_lora_rank + qk_rope_head_dim]`,
and an empty second; `token_shape`):
position p of the sequence in slot s is row `p % block_size` of block `block_table[s, p // block_size]`.
Blocks are handed out by a `BlockAllocator` as sequences grow and returned when they end, so
sequences of very different lengths share the memory (PagedAttention). The last block is a trash
block: padding rows of a static (graph-bucketed) decode step write there and read only zeros, so no
step needs a data-dependent shape to leave them out. The block table has one extra row (the
padding slot) that always names the trash block.

Nothing is allocated per micro-batch or per decode step: a forward writes its chunks' keys and values
by flat cache row (one `index_copy_` per layer and chunk on the torch path; the Triton path's fused
kernel writes them through the block table), and attention reads them in place (the Triton decode
kernel) or gathers a chunk's sequences' blocks (the torch path).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyengine.core import dtypes
from pyengine.core.errors import ResourceError

if TYPE_CHECKING:
    import torch

    from pyengine.core.spec import DeploymentSpec

BLOCK_SIZE = 16
"""Tokens per KV block (vLLM's default; the decode kernel reads a block per tile)."""


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


def cache_bytes(spec: DeploymentSpec, sequences: int, capacity: int, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of K and V for every layer: `sequences` slots of up to `capacity` tokens, each rounded up
    to whole blocks, plus the trash block."""
    m = spec.model
    if not m.layered:
        return 0
    rows = (sequences * blocks_for(capacity, block_size) + 1) * block_size
    heads, k_width, v_width = token_shape(m)
    return m.layers * rows * heads * (k_width + v_width) * dtypes.nbytes(m.dtype)


def token_shape(model) -> tuple[int, int, int]:
    """(heads, key width, value width) one token holds per layer: GQA's kv_heads keys and values of
    d; MLA's one latent row (kv_lora_rank + qk_rope_head_dim) that serves as key and value alike,
    so no separate value (width 0)."""
    if model.mla is not None:
        return 1, model.mla.latent_width, 0
    return model.kv_heads, model.head_size, model.head_size


class BlockAllocator:
    """Which blocks each slot holds, on the host. Deterministic (lowest free block first, freed blocks
    reused lowest first), so every rank that replays the same plans holds the same tables."""

    def __init__(self, blocks: int, block_size: int, slots: int, max_blocks: int):
        self.block_size, self.max_blocks, self.total = block_size, max_blocks, blocks
        self._free = list(range(blocks - 1, -1, -1))  # pop() hands out the lowest
        self.table: list[list[int]] = [[] for _ in range(slots)]

    @property
    def free(self) -> int:
        return len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.block_size)

    def grow(self, slot: int, length: int) -> list[tuple[int, int, int]]:
        """Give `slot` blocks for `length` tokens; returns the new (slot, index, block) entries."""
        need = self.blocks_for(length)
        held = self.table[slot]
        if need > self.max_blocks:
            raise ResourceError(f"KV slot {slot} of {length} tokens", f"{need} blocks of {self.block_size}",
                                f"a slot holds at most {self.max_blocks}")
        if need - len(held) > len(self._free):
            raise ResourceError(f"KV slot {slot} of {length} tokens", f"{need - len(held)} more blocks",
                                f"{len(self._free)} are free")
        new = []
        while len(held) < need:
            block = self._free.pop()
            new.append((slot, len(held), block))
            held.append(block)
        return new

    def release(self, slot: int) -> None:
        self._free.extend(reversed(self.table[slot]))
        self._free.sort(reverse=True)
        self.table[slot] = []


class KVCache:
    """`slots` sequences of up to `capacity` tokens each (the default block count holds them all at
    full length; `blocks` fewer pages them)."""

    def __init__(self, spec: DeploymentSpec, slots: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype, *, block_size: int = BLOCK_SIZE, blocks: int | None = None):
        import torch

        m = spec.model
        self.block_size, self.slots, self.capacity = block_size, slots, capacity
        self.max_blocks = blocks_for(capacity, block_size)
        self.blocks = slots * self.max_blocks if blocks is None else blocks
        self.trash = self.blocks
        heads, k_width, v_width = token_shape(m)
        rows = (m.layers, self.blocks + 1, block_size, heads)
        # Zeroed once: a padding row reads the trash block, and attention weights of 0 times a NaN
        # left in fresh memory would still be NaN.
        self.k = torch.zeros(rows + (k_width,), dtype=dtype, device=device)
        self.v = torch.zeros(rows + (v_width,), dtype=dtype, device=device)
        """MLA: k holds the latent rows, v is empty (width 0)."""
        self.block_table = torch.full((slots + 1, self.max_blocks), self.trash, dtype=torch.int32,
                                      device=device)
        """[slots + 1, max_blocks] int32 on the device; row `slots` is the padding slot (all trash)."""
        self.allocator = BlockAllocator(self.blocks, block_size, slots, self.max_blocks)

    @property
    def padding_slot(self) -> int:
        return self.slots

    def fits(self, slots: int, capacity: int) -> bool:
        return slots <= self.slots and capacity <= self.capacity

    def layer_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V, [blocks + 1, block_size, kv_heads, d]."""
        return self.k[layer], self.v[layer]

    # ---- blocks ----------------------------------------------------------------------------------
    def grow(self, lengths: dict[int, int]) -> None:
        """Give each slot blocks for its new length ({slot: tokens}) and write the new entries into
        the device block table (one scatter, none when no slot crossed a block boundary)."""
        new = [e for slot, n in lengths.items() for e in self.allocator.grow(slot, n)]
        self.apply(new)

    def apply(self, entries: list[tuple[int, int, int]]) -> None:
        if not entries:
            return
        import torch

        flat = torch.tensor([[s * self.max_blocks + i for s, i, _ in entries], [b for _, _, b in entries]])
        flat = flat.to(self.block_table.device, non_blocking=True)  # pageable, staged: no stream sync
        self.block_table.view(-1).index_copy_(0, flat[0], flat[1].to(torch.int32))

    def release(self, slot: int) -> None:
        """Return the slot's blocks (their device table entries are rewritten when next handed out)."""
        self.allocator.release(slot)

    def reset(self) -> None:
        """Every slot released (a new generation reuses the allocation)."""
        for slot in range(self.slots):
            self.allocator.release(slot)

    # ---- rows (torch path) ----------------------------------------------------------------------
    def rows(self, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat row of (slot, position) in a layer's `[(blocks + 1) * block_size, kv, d]` view, int64;
        the padding slot's rows fall in the trash block."""
        bs = self.block_size
        block = self.block_table[slots.long(), (positions // bs).long()]
        return block.long() * bs + (positions % bs).long()

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [t, kv_heads, d] at flat cache rows `rows` [t] (one launch each)."""
        kc, vc = self.layer_views(layer)
        kc.view(-1, *kc.shape[2:]).index_copy_(0, rows, k)
        if vc.shape[-1]:
            vc.view(-1, *vc.shape[2:]).index_copy_(0, rows, v)

    def gather(self, layer: int, slots: torch.Tensor, n_blocks: int,
               first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V [len(slots), kv_heads, (n_blocks - first) * block_size, d]: each slot's blocks
        first..n_blocks-1 (a copy; the torch path's reads; `first` > 0: a window's)."""
        kc, vc = self.layer_views(layer)
        blocks = self.block_table[slots.long(), first:n_blocks].long()  # [g, n_blocks - first]
        g, n = blocks.shape

        def one(c):
            return c[blocks].reshape(g, n * self.block_size, *c.shape[2:]).transpose(1, 2)
        return one(kc), one(vc)
