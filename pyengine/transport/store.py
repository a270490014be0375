"""The rendezvous store every multi-process transport starts from (torch.distributed's TCPStore).

Rank 0 hosts it at MASTER_ADDR:MASTER_PORT, or torchrun's agent does when it says so
(TORCHELASTIC_USE_AGENT_STORE=True); every other rank connects as a client.
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from pyengine.transport.base import TransportError

PREFIX = "pyengine"
"""Our keys live under this prefix, apart from torchrun's own."""


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
    try:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except KeyError as exc:
        raise TransportError(f"no store given and {exc.args[0]} is not set (run under torchrun "
                             "or pass store=)") from None
    try:
        return connect_store(rank, world_size, port, host=host, timeout_s=timeout_s)
    except (RuntimeError, OSError) as exc:
        raise TransportError(f"rank {rank}: could not reach the store at {host}:{port} "
                             f"within {timeout_s:g} s: {exc}") from exc
