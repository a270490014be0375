"""Transports: one protocol (:mod:`pyengine.transport.base`), three backends.

* ``nccl``  — one process per GPU, pyengine._C communicators (:mod:`.nccl`).
* ``gloo``  — one process per rank on CPU, torch.distributed gloo (:mod:`.gloo`).
* ``local`` — N virtual ranks (threads) in one process on one device:
  ``LocalTransport.create(world_size, device, timeout_s)`` (:mod:`.local`).

Backend modules load lazily, so importing this package costs only torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from pyengine.transport.base import (
    DEFAULT_TIMEOUT_S,
    Handle,
    Transport,
    TransportError,
)

__all__ = [
    "DEFAULT_TIMEOUT_S",
    "GlooTransport",
    "Handle",
    "LocalTransport",
    "NcclTransport",
    "Transport",
    "TransportError",
    "create_transport",
]


def create_transport(backend: str, *, rank: int, world_size: int,
                     device: torch.device | str | int | None, groups: Sequence[Sequence[int]],
                     store: Any = None, timeout_s: float = DEFAULT_TIMEOUT_S) -> Transport:
    """A multi-process transport for this rank.

    backend: "nccl" (device: this rank's GPU) or "gloo" (device: None or "cpu").
    groups: every collective group used later, identical (and identically ordered) on all
      ranks; the world group is always created.
    store: a torch.distributed Store shared by all ranks; None means a TCPStore at
      MASTER_ADDR:MASTER_PORT hosted by rank 0 (torchrun's environment).
    For "local" (threads in one process) use LocalTransport.create(world_size, device, timeout_s).
    """
    make = _MULTI_PROCESS.get(backend)
    if make is None:
        if backend == LOCAL:
            raise TransportError("the local backend has one process and N virtual ranks: use "
                                 "LocalTransport.create(world_size, device, timeout_s)")
        raise TransportError(f"unknown transport backend {backend!r} (nccl, gloo or local)")
    return make(rank, world_size, device, groups, store, timeout_s)


def _nccl(rank: int, world_size: int, device, groups, store, timeout_s: float) -> Transport:
    from pyengine.transport.nccl import NcclTransport

    return NcclTransport(rank=rank, world_size=world_size, device=device if device is not None else rank,
                         groups=groups, store=store, timeout_s=timeout_s)


def _gloo(rank: int, world_size: int, device, groups, store, timeout_s: float) -> Transport:
    from pyengine.transport.gloo import GlooTransport
    from pyengine.transport.store import store_from_env

    if device is not None and torch.device(device).type != "cpu":
        raise TransportError(f"gloo transport runs on CPU, got device {device}")
    if store is None:
        store = store_from_env(rank, world_size, timeout_s)
    return GlooTransport(rank=rank, world_size=world_size, store=store, groups=groups, timeout_s=timeout_s)


LOCAL = "local"
_MULTI_PROCESS = {"nccl": _nccl, "gloo": _gloo}
"""The backends with a process per rank, by name, and how each connects this rank."""


def __getattr__(attr: str) -> Any:
    if attr == "GlooTransport":
        from pyengine.transport.gloo import GlooTransport

        return GlooTransport
    if attr == "LocalTransport":
        from pyengine.transport.local import LocalTransport

        return LocalTransport
    if attr == "NcclTransport":
        from pyengine.transport.nccl import NcclTransport

        return NcclTransport
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
