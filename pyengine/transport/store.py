"""The rendezvous store every multi-process transport starts from (torch.distributed's TCPStore).

Rank 0 hosts it at MASTER_ADDR:MASTER_PORT, or torchrun's agent does when it says so
(TORCHELASTIC_USE_AGENT_STORE=True); every other rank connects as a client.
"""

from __future__ import annotations

import datetime
import os
import time
from typing import Any

from pyengine.transport.base import TransportError

PREFIX = "pyengine"
"""Our keys live under this prefix, apart from torchrun's own."""
STARTUP_TIMEOUT_S = 60.0
"""Bound on reaching the store and on every rank showing up: starting a process and importing
torch takes seconds, whatever the per-action timeout (which may be a fraction of a second)."""


def host_store(world_size: int, timeout_s: float) -> Any:
    """A TCPStore hosted by this (launcher) process on a free port (`.port`): it outlives any
    rank, so the ranks' rendezvous survives one of them dying. Children connect as clients
    (TORCHELASTIC_USE_AGENT_STORE=True)."""
    import torch.distributed as dist

    return dist.TCPStore("127.0.0.1", 0, world_size, True,
                         timeout=datetime.timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S)),
                         wait_for_workers=False)


def wait_for_ranks(store: Any, rank: int, world_size: int, timeout_s: float) -> None:
    """Every rank announces itself and waits for the others (start-up, not a per-action wait)."""
    store.set(f"started/{rank}", b"1")
    deadline = time.monotonic() + timeout_s
    missing = list(range(world_size))
    while missing:
        missing = [r for r in missing if not store.check([f"started/{r}"])]
        if missing and time.monotonic() > deadline:
            raise TransportError(f"rank {rank}: rank(s) {missing} did not start within {timeout_s:g} s")
        time.sleep(0.02 if missing else 0)


def connect_store(rank: int, world_size: int, port: int, *, host: str = "127.0.0.1",
                  timeout_s: float = 60.0) -> Any:
    """A TCPStore at host:port, hosted by rank 0 unless torchrun's agent already hosts it."""
    import torch.distributed as dist

    is_host = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true"
    store = dist.TCPStore(host, port, world_size, is_host,
                          timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
    return dist.PrefixStore(PREFIX, store)


def store_from_env(rank: int, world_size: int, timeout_s: float) -> Any:
    """The store at MASTER_ADDR:MASTER_PORT (torchrun's, or the launcher's spawned ranks')."""
    from pyengine.core.env import env_int

    host, port = os.environ.get("MASTER_ADDR"), env_int("MASTER_PORT", low=1, high=65535)
    for name, value in (("MASTER_ADDR", host), ("MASTER_PORT", port)):
        if value is None:
            raise TransportError(f"no store given and {name} is not set (run under torchrun "
                                 "or pass store=)")
    try:
        return connect_store(rank, world_size, port, host=host, timeout_s=timeout_s)
    except (RuntimeError, OSError) as exc:
        raise TransportError(f"rank {rank}: could not reach the store at {host}:{port} "
                             f"within {timeout_s:g} s: {exc}") from exc
