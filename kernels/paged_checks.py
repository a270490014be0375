"""Argument checks shared by the kernels that address the paged KV cache (decode attention,
the q/k norm + RoPE + cache write): one line naming the argument, its value and the rule.

The cache layout: one layer's K (or V) is [num_blocks, block_size, kv_heads, d], contiguous;
block_table [num_slots, max_blocks] int32 lists each slot's blocks in order; slots [n] int32
names each row's slot (-1: a padding row). A table is read as a ring: position p's block is entry
(p // block_size) % max_blocks, so a table of `ring_blocks(window)` entries serves a sliding
window over any number of positions (the old blocks are overwritten as the sequence grows).
"""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def check_tensor(name: str, t, *, dims: int, dtypes: tuple, device: torch.device | None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: got {type(t).__name__}; must be a torch.Tensor")
    if t.dtype not in dtypes:
        raise TypeError(f"{name}.dtype={t.dtype}: must be one of {dtypes}")
    if t.dim() != dims:
        raise ValueError(f"{name}.shape={tuple(t.shape)}: must have {dims} dims")
    if device is not None and t.device != device:
        raise ValueError(f"{name}.device={t.device}: must be {device}")


def check_static(*, heads: int, kv_heads: int, head_dim: int, block_size: int,
                 max_blocks: int, dtype: torch.dtype, max_head_dim: int, **counts: int) -> None:
    """The static shapes of a prepared paged-cache kernel."""
    for name, value in dict(heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                            block_size=block_size, max_blocks=max_blocks, **counts).items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r}: must be an int >= 1")
    if heads % kv_heads:
        raise ValueError(f"heads={heads}: must be a multiple of kv_heads={kv_heads} (GQA)")
    if head_dim > max_head_dim:
        raise ValueError(f"head_dim={head_dim}: must be <= {max_head_dim}")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size={block_size}: must be a power of two")
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype={dtype}: must be one of {FLOAT_DTYPES}")


def check_cache(name: str, cache, *, kv_heads: int | None, head_dim: int | None,
                dtype: torch.dtype, device: torch.device) -> tuple[int, int, int]:
    """(num_blocks, block_size, kv_heads) of one layer's contiguous K or V cache (kv_heads,
    head_dim None: any)."""
    check_tensor(name, cache, dims=4, dtypes=(dtype,), device=device)
    num_blocks, block_size, heads, d = cache.shape
    if (head_dim is not None and d != head_dim) or (kv_heads is not None and heads != kv_heads):
        want = f"[num_blocks, block_size, {kv_heads or 'kv_heads'}, {head_dim or 'd'}]"
        raise ValueError(f"{name}.shape={tuple(cache.shape)}: must be {want}")
    if not cache.is_contiguous():
        raise ValueError(f"{name}.stride()={cache.stride()}: must be contiguous")
    if block_size < 1 or block_size & (block_size - 1):
        raise ValueError(f"{name}.shape[1]={block_size}: block_size must be a power of two")
    return num_blocks, block_size, heads


def check_rows(n: int, device: torch.device, block_table, slots, **per_row) -> None:
    """block_table [num_slots, max_blocks] int32; slots and each per-row tensor [n] int32."""
    check_tensor("block_table", block_table, dims=2, dtypes=(torch.int32,), device=device)
    if block_table.stride(1) != 1:
        raise ValueError(f"block_table.stride()={block_table.stride()}: rows must be contiguous")
    for name, t in dict(slots=slots, **per_row).items():
        check_tensor(name, t, dims=1, dtypes=(torch.int32,), device=device)
        if t.shape[0] != n:
            raise ValueError(f"{name}.shape={tuple(t.shape)}: must be [n={n}]")
        if not t.is_contiguous():
            raise ValueError(f"{name}.stride()={t.stride()}: must be contiguous")


def ring_blocks(window: int, block_size: int) -> int:
    """Table entries a ring needs for a `window`: ceil(window / block_size). Position p lives at
    (entry (p // block_size) % R, row p % block_size), which repeats only every R * block_size
    positions, so any `window` consecutive positions (the key being written and the window-1
    before it) hold distinct rows; the block being written may share a table entry with the window's
    oldest block (they use different rows of it)."""
    return -(-window // block_size)


def check_row_values(block_table, slots, num_blocks: int, block_size: int,
                     keys_per_row: dict, window: int = 0) -> None:
    """Values (one host sync): slots in [-1, num_slots); each live row's key count (name ->
    [n] tensor) in [0, max_blocks * block_size], or any count >= 0 when the table is a ring of
    `window` (window > 0 and max_blocks >= ring_blocks); the blocks those keys use in
    [0, num_blocks)."""
    num_slots, max_blocks = block_table.shape
    ring = window > 0 and max_blocks >= ring_blocks(window, block_size)
    bound = None if ring else max_blocks * block_size
    s = slots.cpu().long()
    if s.numel() and (int(s.min()) < -1 or int(s.max()) >= num_slots):
        raise ValueError(f"slots: values span [{int(s.min())}, {int(s.max())}]; must lie in "
                         f"-1 (padding) or [0, num_slots={num_slots})")
    table = block_table.cpu().long()
    for name, keys in keys_per_row.items():
        k = keys.cpu().long()
        live = s >= 0
        if live.any() and (int(k[live].min()) < 0 or (bound is not None and int(k[live].max()) > bound)):
            raise ValueError(f"{name}: live rows span [{int(k[live].min())}, {int(k[live].max())}]; "
                             f"must lie in [0, max_blocks * block_size = {max_blocks * block_size}] "
                             f"(a table of >= ring_blocks(window) entries with window > 0: any count)")
        for row in torch.nonzero(live).flatten().tolist():
            used = table[s[row], : min(max_blocks, -(-int(k[row]) // block_size))]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= num_blocks):
                raise ValueError(f"block_table[{int(s[row])}]: blocks used by row {row} span "
                                 f"[{int(used.min())}, {int(used.max())}]; must lie in "
                                 f"[0, num_blocks={num_blocks})")
