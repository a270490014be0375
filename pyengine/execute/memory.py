"""Memory a job's ranks may draw on, as measured on this machine: a budget's record, the host's
available memory and the GPUs' (which backend draws on which: `Backend.memory_budget`).
Host memory is /proc/meminfo's MemAvailable (what can be allocated without swapping);
without /proc, the free physical pages. None when neither can be read: the check is skipped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PROCESS_BYTES = 400_000_000
"""One rank process besides its tensors: measured ~230 MB RSS after torch and gloo start on
CPU (ps), rounded up for allocator slack."""


@dataclass(frozen=True, slots=True)
class Budget:
    bytes: int
    """Memory available to the job (shared: all ranks together; else: each rank)."""
    shared: bool
    """True when all ranks draw on one pool (one host or one device)."""
    what: str
    """Where the number comes from, for the error line."""
    per_rank_overhead: int = 0
    """Bytes each rank costs besides its tensors (a process per rank on the host)."""


def host_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def gpu_bytes(count: int) -> int | None:
    """The smallest total memory among the first `count` visible GPUs (None without CUDA)."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        return None
    n = min(count, torch.cuda.device_count())
    return min(torch.cuda.get_device_properties(i).total_memory for i in range(n))
