"""The CUDA streams a rank uses, made once per (device, rank, role) and checked distinct.

torch hands out `torch.cuda.Stream()`s round-robin from a fixed pool (32 per priority per
device), so a one-GPU run that made fresh streams for every variant's runtime and transport
wrapped around it and let a later runtime's compute stream be a transport's comm stream:
compute then serialised behind comm and the measured overlap was a lie. Streams made here are
kept for the process and reused by every runtime and transport of that rank, so the count stays
ranks x roles, well inside the pool; `check_distinct` proves the roles of one rank never share.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

_streams: dict[tuple[str, int, str], Any] = {}
_lock = threading.Lock()  # the local transport builds its ranks' runtimes in threads


def rank_stream(device: torch.device, rank: int, role: str):
    """The stream of `role` ("compute", "side", "comm", ...) on `rank`, made on first use."""
    key = (str(device), rank, role)
    with _lock:
        if key not in _streams:
            _streams[key] = torch.cuda.Stream(device)
        return _streams[key]


def stream_key(stream) -> tuple[int, int]:
    """What makes two stream objects the same CUDA stream: its device and raw handle."""
    return (int(getattr(stream, "device_index", -1)), int(stream.cuda_stream))


def check_distinct(rank: int, roles: dict[str, Any]) -> None:
    """Raise naming the two roles if two of `rank`'s streams are one CUDA stream (None: no stream)."""
    seen: dict[tuple[int, int], str] = {}
    for role, stream in roles.items():
        if stream is None:
            continue
        key = stream_key(stream)
        if key in seen:
            raise RuntimeError(f"rank {rank}: streams '{seen[key]}' and '{role}' are the same CUDA "
                               f"stream ({key[1]:#x}); comm would serialise behind compute")
        seen[key] = role


def transport_streams(transport) -> dict[str, Any]:
    """A transport's comm streams by role: local's one `stream`, nccl's one per group."""
    groups = getattr(transport, "streams", None)
    if isinstance(groups, dict):
        return {f"comm{list(group)}": s for group, s in groups.items()}
    return {"comm": getattr(transport, "stream", None)}
