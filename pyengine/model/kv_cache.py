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

A sliding-window layer (gpt-oss's) keeps only its window: its keys and values live in a ring,
`[sliding layers, slots * R + 1, block_size, kv_heads, d]` with R = `ring_blocks(window)` blocks per
slot, fixed at set-up (slot s owns blocks s * R .. s * R + R - 1; the last is the ring's trash
block), and `ring_table` [slots + 1, R] names them. Position p lives in entry (p // block_size) % R,
so a row is overwritten only once the window has passed it (R * block_size >= window); the
kernels read every table that way (a full layer's table never wraps). A prefill chunk longer than
the ring writes only its last R blocks' worth of positions (the earlier ones go to the trash block)
and attends over the keys it read from the ring before writing and its own fresh keys
(`attention.attend_prefill_ring`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pyengine.core import dtypes
from pyengine.core.errors import ResourceError
from pyengine.kernels.paged_checks import ring_blocks

if TYPE_CHECKING:
    import torch

    from pyengine.core.spec import DeploymentSpec

BLOCK_SIZE = 16
"""Tokens per KV block (vLLM's default; the decode kernel reads a block per tile)."""


def blocks_for(tokens: int, block_size: int = BLOCK_SIZE) -> int:
    return -(-tokens // block_size)


def ring_width(model, layer: int, capacity: int, block_size: int = BLOCK_SIZE) -> int:
    """Blocks per slot of `layer`'s ring (a sliding window's), or 0: a full layer, or a window whose
    ring would not be smaller than the slot's blocks."""
    window = model.window(layer)
    ring = ring_blocks(window, block_size) if window else 0
    return ring if 0 < ring < blocks_for(capacity, block_size) else 0


def cache_bytes(spec: DeploymentSpec, sequences: int, capacity: int, block_size: int = BLOCK_SIZE) -> int:
    """Bytes of K and V for every layer: `sequences` slots of up to `capacity` tokens, each rounded up
    to whole blocks (a sliding layer: its ring's blocks), plus the trash block."""
    m = spec.model
    if not m.layered:
        return 0
    heads, k_width, v_width = token_shape(m)
    blocks = sum(sequences * (ring_width(m, layer, capacity, block_size) or blocks_for(capacity, block_size)) + 1
                 for layer in range(m.layers))
    return blocks * block_size * heads * (k_width + v_width) * dtypes.nbytes(m.dtype)


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
        widths = [ring_width(m, layer, capacity, block_size) for layer in range(m.layers)]
        self.ring = max(widths)
        """Blocks per slot of the sliding layers' ring (0: no ring)."""
        self._place = {}  # layer -> (ring?, index in its storage)
        for layer, w in enumerate(widths):
            self._place[layer] = (bool(w), sum(1 for x in widths[:layer] if bool(x) == bool(w)))
        full = sum(1 for w in widths if not w)
        # Zeroed once: a padding row reads the trash block, and attention weights of 0 times a NaN
        # left in fresh memory would still be NaN.
        zeros = lambda n, blocks, width: torch.zeros(n, blocks + 1, block_size, heads, width, dtype=dtype,
                                                     device=device)
        self.k, self.v = zeros(full, self.blocks, k_width), zeros(full, self.blocks, v_width)
        """MLA: k holds the latent rows, v is empty (width 0)."""
        ring_blocks_all = slots * self.ring
        self.ring_k = zeros(m.layers - full, ring_blocks_all, k_width)
        self.ring_v = zeros(m.layers - full, ring_blocks_all, v_width)
        self.block_table = torch.full((slots + 1, self.max_blocks), self.trash, dtype=torch.int32,
                                      device=device)
        """[slots + 1, max_blocks] int32 on the device; row `slots` is the padding slot (all trash)."""
        ring = torch.arange(ring_blocks_all, dtype=torch.int32).view(slots, self.ring)
        self.ring_table = torch.cat([ring, torch.full((1, self.ring), ring_blocks_all, dtype=torch.int32)]).to(device)
        """[slots + 1, ring] int32, fixed: slot s's ring blocks, then the padding slot's (the ring's trash)."""
        self.allocator = BlockAllocator(self.blocks, block_size, slots, self.max_blocks)

    @property
    def padding_slot(self) -> int:
        return self.slots

    def fits(self, slots: int, capacity: int) -> bool:
        return slots <= self.slots and capacity <= self.capacity

    @property
    def nbytes(self) -> int:
        """Bytes held: every layer's K and V (`cache_bytes` prices them)."""
        return sum(t.nbytes for t in (self.k, self.v, self.ring_k, self.ring_v))

    def is_ring(self, layer: int) -> bool:
        return self._place[layer][0]

    def layer_views(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's K and V, [blocks + 1, block_size, kv_heads, d] (a ring layer's blocks)."""
        ring, i = self._place[layer]
        return (self.ring_k[i], self.ring_v[i]) if ring else (self.k[i], self.v[i])

    def table(self, layer: int) -> torch.Tensor:
        """The block table `layer`'s kernels read: the paged one, or the ring's."""
        return self.ring_table if self.is_ring(layer) else self.block_table

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
        return self._rows(self.block_table, slots, positions)

    def ring_rows(self, slots: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor | None:
        """The same in a ring layer's view (None: no ring); a row more than the ring's length before
        its segment's end (`lengths`) goes to the ring's trash block, so a long prefill chunk writes
        each ring row once."""
        if not self.ring:
            return None
        import torch

        rows = self._rows(self.ring_table, slots, positions)
        trash = self.ring_table[-1, 0].long() * self.block_size + (positions % self.block_size).long()
        return torch.where((lengths - positions) > self.ring * self.block_size, trash, rows)

    def _rows(self, table, slots, positions):
        bs = self.block_size
        block = table[slots.long(), ((positions // bs) % table.shape[1]).long()]
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
        import torch

        kc, vc = self.layer_views(layer)
        table = self.table(layer)  # a ring's entries repeat: blocks past the window are masked
        entries = torch.arange(first, n_blocks, device=table.device) % table.shape[1]
        blocks = table[slots.long()][:, entries].long()  # [g, n_blocks - first]
        g, n = blocks.shape

        def one(c):
            return c[blocks].reshape(g, n * self.block_size, *c.shape[2:]).transpose(1, 2)
        return one(kc), one(vc)
