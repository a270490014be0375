"""gloo transport: real processes on CPU; what only gloo does. A peer that never shows up at
start-up, and one that joined but never answers, named within the transport's timeout with gloo's
own message kept. Every op, a silent peer under synchronize, abort: the transport contract
(test_transport_contract.py), which runs over every backend."""

import multiprocessing
import time

import pytest
import torch

from pyengine.execute.procs import RankFailure, spawn_ranks
from pyengine.transport import create_transport
from pyengine.transport.store import connect_store


def _rank2_never_starts(rank: int, nranks: int, port: int) -> None:
    if rank == 2:
        time.sleep(3600)  # never joins
    store = connect_store(rank, nranks, port, timeout_s=10)
    create_transport("gloo", rank=rank, world_size=nranks, device="cpu", groups=[], store=store,
                     timeout_s=2)


def _rank2_never_answers(rank: int, nranks: int, port: int) -> None:
    store = connect_store(rank, nranks, port, timeout_s=10)
    tr = create_transport("gloo", rank=rank, world_size=nranks, device="cpu", groups=[],
                          store=store, timeout_s=2)
    if rank == 2:
        time.sleep(3600)  # joined, then stalls forever
    tr.recv(torch.empty(3), 2, name="mb7").wait()


@pytest.mark.slow
def test_missing_peer_is_named_within_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_rank2_never_starts, 3, timeout_s=60)
    assert info.value.rank in (0, 1)
    assert "TransportError" in str(info.value)
    assert "rank(s) [2] never joined within 5 s" in str(info.value)  # start-up: CONNECT_FLOOR_S
    assert time.monotonic() - start < 20
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_stalled_peer_is_named_within_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_rank2_never_answers, 3, timeout_s=60)
    assert info.value.rank in (0, 1)
    assert "gloo recv 'mb7'" in str(info.value) and "peer 2" in str(info.value)
    assert "timed out" in str(info.value) and "gloo:" in str(info.value)  # gloo's own message is kept
    assert time.monotonic() - start < 20
    assert multiprocessing.active_children() == []
