"""gloo transport: real processes on CPU (2 and 3 ranks), every op on odd sizes and
fp32/fp16/bf16/int32, and a peer that never shows up or never answers."""

import multiprocessing
import time

import pytest
import torch

from pyengine.execute.procs import RankFailure, spawn_ranks
from pyengine.transport import TransportError, create_transport
from pyengine.transport.store import connect_store

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32)
COUNTS = (1, 1023)  # a single element; an odd count that fits no vector width


def fill(rank: int, count: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """Small integers: every sum below is exact in every dtype tested."""
    return ((torch.arange(count) + offset) * 7 + rank * 3).remainder(11).to(dtype)


def _all_ops(rank: int, nranks: int, port: int) -> dict:
    """Runs every op and returns the results keyed by (op, dtype name, count)."""
    torch.set_num_threads(1)
    world = tuple(range(nranks))
    sub = tuple(range(1, nranks))  # e.g. (1, 2): the experts' TP group
    store = connect_store(rank, nranks, port, timeout_s=20)
    out = {}
    with create_transport("gloo", rank=rank, world_size=nranks, device="cpu",
                          groups=[world, sub], store=store, timeout_s=20) as tr:
        for dtype in DTYPES:
            for count in COUNTS:
                key = (str(dtype), count)
                x = fill(rank, count, dtype)
                tr.all_reduce(x, world, name="ar").wait()
                out[("all_reduce",) + key] = x
                big = fill(rank, count * nranks, dtype)
                chunk = torch.empty(count, dtype=dtype)
                tr.reduce_scatter(chunk, big, world, name="rs").wait()
                out[("reduce_scatter",) + key] = chunk
                b = fill(rank, count, dtype)
                tr.broadcast(b, nranks - 1, world, name="bc").wait()
                out[("broadcast",) + key] = b
                # two messages to the same peer: they must match in issue order
                s1, s2 = fill(rank, count, dtype), fill(rank, count, dtype, offset=5)
                r1, r2 = torch.empty(count, dtype=dtype), torch.empty(count, dtype=dtype)
                prev, nxt = (rank - 1) % nranks, (rank + 1) % nranks
                hs = [tr.send(s1, nxt, name="p2p1"), tr.send(s2, nxt, name="p2p2"),
                      tr.recv(r1, prev, name="p2p1"), tr.recv(r2, prev, name="p2p2")]
                for h in hs:
                    h.wait()
                assert all(h.is_completed() for h in hs)
                out[("sendrecv",) + key] = torch.cat([r1, r2])
                if rank in sub:
                    y = fill(rank, count, dtype)
                    tr.all_reduce(y, sub, name="ar_sub").wait()
                    out[("all_reduce_sub",) + key] = y
        tr.barrier()
    return out


def _reference(rank: int, nranks: int, op: str, dtype: torch.dtype, count: int) -> torch.Tensor:
    """The obvious way, in int64 (exact), cast at the end."""
    world = range(nranks)
    if op == "all_reduce":
        return sum(fill(r, count, torch.int64) for r in world).to(dtype)
    if op == "all_reduce_sub":
        return sum(fill(r, count, torch.int64) for r in range(1, nranks)).to(dtype)
    if op == "reduce_scatter":
        full = sum(fill(r, count * nranks, torch.int64) for r in world)
        return full[rank * count:(rank + 1) * count].to(dtype)
    if op == "broadcast":
        return fill(nranks - 1, count, dtype)
    prev = (rank - 1) % nranks
    return torch.cat([fill(prev, count, dtype), fill(prev, count, dtype, offset=5)])


@pytest.mark.slow
@pytest.mark.parametrize("nranks", [2, 3])
def test_every_op_every_dtype(nranks):
    results = spawn_ranks(_all_ops, nranks, timeout_s=90, env={"OMP_NUM_THREADS": "1"})
    for rank, got in enumerate(results):
        checked = 0
        for (op, dtype_name, count), tensor in got.items():
            dtype = next(d for d in DTYPES if str(d) == dtype_name)
            assert tensor.dtype == dtype
            expected = _reference(rank, nranks, op, dtype, count)
            assert torch.equal(tensor, expected), (rank, op, dtype_name, count)
            checked += 1
        ops = 5 if rank >= 1 else 4
        assert checked == ops * len(DTYPES) * len(COUNTS)
    assert multiprocessing.active_children() == []


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
    assert "timed out" in str(info.value)
    assert time.monotonic() - start < 20
    assert multiprocessing.active_children() == []


def _synchronize_on_silent_peer(rank: int, nranks: int, port: int) -> None:
    store = connect_store(rank, nranks, port, timeout_s=10)
    tr = create_transport("gloo", rank=rank, world_size=nranks, device="cpu", groups=[],
                          store=store, timeout_s=30)
    if rank == 1:
        time.sleep(3600)  # joined, never sends
    h = tr.recv(torch.empty(3), 1, name="mb9")
    assert not h.is_completed()
    h.synchronize(1.0)  # well below the transport's 30 s


@pytest.mark.slow
def test_synchronize_names_the_silent_peer_within_its_timeout():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_synchronize_on_silent_peer, 2, timeout_s=60)
    text = str(info.value)
    assert info.value.rank == 0
    assert "TransportError" in text and "gloo recv 'mb9' (rank 0, peer 1) timed out" in text
    assert "limit 1 s" in text and "gloo:" in text  # gloo's own message is kept
    assert time.monotonic() - start < 25
    assert multiprocessing.active_children() == []


def _abort_then_wait(rank: int, nranks: int, port: int) -> tuple[str, float, str]:
    store = connect_store(rank, nranks, port, timeout_s=10)
    tr = create_transport("gloo", rank=rank, world_size=nranks, device="cpu", groups=[],
                          store=store, timeout_s=30)
    if rank == 1:
        store.wait(["aborted"])  # stay alive until rank 0 is done: it is the peer never sending
        return "", 0.0, ""
    h = tr.recv(torch.empty(3), 1, name="mb4")
    with tr.group():  # gloo issues at once; the block exists for parity
        pass
    tr.abort()
    tr.abort()  # idempotent
    start = time.monotonic()
    with pytest.raises(TransportError) as pending:
        h.synchronize()
    elapsed = time.monotonic() - start
    with pytest.raises(TransportError) as late:
        tr.send(torch.ones(1), 1, name="late")
    store.set("aborted", b"1")
    return str(pending.value), elapsed, str(late.value)


@pytest.mark.slow
def test_abort_fails_pending_waits_at_once():
    pending, elapsed, late = spawn_ranks(_abort_then_wait, 2, timeout_s=60)[0]
    assert pending == "gloo recv 'mb4' (rank 0, peer 1) failed: the transport was aborted before it completed"
    assert elapsed < 1.0
    assert late.startswith("gloo send 'late' (rank 0, peer 1): the transport is aborted") and "create new transports" in late
