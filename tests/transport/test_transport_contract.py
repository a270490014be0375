"""The transport contract, one suite run over every backend: local (threads on CPU; on one GPU
under the gpu mark), gloo (real processes) and nccl (NcclTransport's own code over the fake _C of fake_nccl.py, whose fabric moves
the data between threads as NCCL would). Every op on every dtype and odd counts, against a
reference computed the obvious way; a silent peer named within the bound; an abort failing what
is pending at once; the protocol's shape; refusals of bad arguments. What only one backend does
(local's mismatch reports, gloo's start-up, nccl's streams and events) stays in its own file."""

from __future__ import annotations

import dataclasses
import multiprocessing
import threading
import time

import pytest
import torch
import torch.distributed as dist

from fake_nccl import DeviceTensor, FakeC, install
from helpers import each_rank
from pyengine.transport import Handle, LocalTransport, Transport, TransportError, create_transport

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32)
COUNTS = (1, 1023)  # a single element; an odd count that fits no vector width
BACKENDS = ("local", pytest.param("gloo", marks=pytest.mark.slow),  # gloo: ~10 s a test (processes)
            "nccl", pytest.param("local-cuda", marks=pytest.mark.gpu))


def fill(rank: int, count: int, dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
    """Small integers: every sum below is exact in every dtype tested."""
    return ((torch.arange(count) + offset) * 7 + rank * 3).remainder(11).to(dtype)


@dataclasses.dataclass
class Rank:
    """What a body gets besides its transport: tensors placed where the backend wants them,
    read back on the host, and `meet()`, a rendezvous of all ranks outside the transport."""

    on_device: bool  # the fake nccl's tensors: CPU memory that says it is on a CUDA device
    meet: object

    def put(self, t, tensor: torch.Tensor):
        return DeviceTensor(tensor.clone(), t.device) if self.on_device else tensor.clone().to(t.device)

    def empty(self, t, count: int, dtype: torch.dtype):
        return self.put(t, torch.zeros(count, dtype=dtype))

    @staticmethod
    def get(tensor) -> torch.Tensor:
        return tensor.cpu()


# -- running a body on every rank of a backend ----------------------------------------------------

class _StoreMeet:
    """meet() for processes: every rank sets its key of round i and waits for the others'."""

    def __init__(self, store, rank: int, world: int):
        self.store, self.rank, self.world, self.round = store, rank, world, 0

    def __call__(self) -> None:
        self.round += 1
        self.store.set(f"meet/{self.round}/{self.rank}", b"1")
        self.store.wait([f"meet/{self.round}/{r}" for r in range(self.world)])


def _gloo_rank(rank: int, world: int, port: int, body, groups, timeout_s: float):
    from pyengine.transport.store import connect_store

    torch.set_num_threads(1)
    store = connect_store(rank, world, port, timeout_s=20)
    with create_transport("gloo", rank=rank, world_size=world, device="cpu", groups=groups,
                          store=store, timeout_s=timeout_s) as t:
        return body(t, Rank(False, _StoreMeet(store, rank, world)))


def _on_threads(make_transport, body, world: int, on_device: bool) -> list:
    barrier = threading.Barrier(world)
    out = each_rank(lambda r: body(make_transport(r), Rank(on_device, lambda: barrier.wait(60))), world)
    errors = [o for o in out if isinstance(o, BaseException)]
    if errors:
        raise errors[0]
    return out


def _on_its_device(t):
    if t.device.type == "cuda":  # each virtual rank's thread
        torch.cuda.set_device(t.device)
    return t


@pytest.fixture(params=BACKENDS)
def run(request, monkeypatch):
    """run(body, world, groups=(), timeout_s=20): body(transport, Rank) on every rank of the
    backend; the results in rank order (a rank's exception fails the test)."""
    backend = request.param

    def go(body, world: int, groups=(), timeout_s: float = 20.0) -> list:
        if backend == "gloo":
            from pyengine.execute.procs import spawn_ranks

            out = spawn_ranks(_gloo_rank, world, args=(body, tuple(groups), timeout_s), timeout_s=90,
                              env={"OMP_NUM_THREADS": "1"})
            assert multiprocessing.active_children() == []
            return out
        if backend.startswith("local"):
            device = "cuda" if backend == "local-cuda" else "cpu"
            ts = LocalTransport.create(world, device, timeout_s=timeout_s)
            return _on_threads(lambda r: _on_its_device(ts[r]), body, world, on_device=False)
        fake = FakeC(moves_data=True)
        install(monkeypatch, fake)
        store = dist.HashStore()
        from pyengine.transport.nccl import NcclTransport

        def make(r):
            return NcclTransport(rank=r, world_size=world, device=r, groups=groups, store=store,
                                 timeout_s=timeout_s)
        return _on_threads(make, body, world, on_device=True)

    go.backend = backend
    return go


# -- every op, every dtype ------------------------------------------------------------------------

def _all_ops(t, rank_: Rank) -> dict:
    n, rank = t.world_size, t.rank
    world, sub = tuple(range(n)), tuple(range(1, n))  # e.g. (1, 2): the experts' TP group
    out = {}
    for dtype in DTYPES:
        for count in COUNTS:
            key = (str(dtype), count)
            x = rank_.put(t, fill(rank, count, dtype))
            t.all_reduce(x, world, name="ar").wait()
            out[("all_reduce",) + key] = x
            chunk = rank_.empty(t, count, dtype)
            t.reduce_scatter(chunk, rank_.put(t, fill(rank, count * n, dtype)), world, name="rs").wait()
            out[("reduce_scatter",) + key] = chunk
            b = rank_.put(t, fill(rank, count, dtype))
            t.broadcast(b, n - 1, world, name="bc").wait()
            out[("broadcast",) + key] = b
            # two messages to the same peer: they must match in issue order
            s1, s2 = rank_.put(t, fill(rank, count, dtype)), rank_.put(t, fill(rank, count, dtype, offset=5))
            r1, r2 = rank_.empty(t, count, dtype), rank_.empty(t, count, dtype)
            prev, nxt = (rank - 1) % n, (rank + 1) % n
            hs = [t.send(s1, nxt, name="p2p1"), t.send(s2, nxt, name="p2p2"),
                  t.recv(r1, prev, name="p2p1"), t.recv(r2, prev, name="p2p2")]
            for h in hs:
                h.synchronize()
            out[("sendrecv",) + key] = (r1, r2)
            if rank in sub:
                y = rank_.put(t, fill(rank, count, dtype))
                t.all_reduce(y, sub, name="ar_sub").wait()
                out[("all_reduce_sub",) + key] = y
                z = rank_.put(t, fill(rank, count, dtype))
                t.broadcast(z, sub[0], sub, name="bc_sub").wait()  # global rank 1 is local 0 of (1, 2)
                out[("broadcast_sub",) + key] = z
    t.barrier()
    return {k: torch.cat([Rank.get(x) for x in v]) if isinstance(v, tuple) else Rank.get(v)
            for k, v in out.items()}


def _reference(rank: int, n: int, op: str, dtype: torch.dtype, count: int) -> torch.Tensor:
    """The obvious way, in int64 (exact), cast at the end."""
    if op == "all_reduce":
        return sum(fill(r, count, torch.int64) for r in range(n)).to(dtype)
    if op == "all_reduce_sub":
        return sum(fill(r, count, torch.int64) for r in range(1, n)).to(dtype)
    if op == "reduce_scatter":
        full = sum(fill(r, count * n, torch.int64) for r in range(n))
        return full[rank * count:(rank + 1) * count].to(dtype)
    if op == "broadcast":
        return fill(n - 1, count, dtype)
    if op == "broadcast_sub":
        return fill(1, count, dtype)
    prev = (rank - 1) % n
    return torch.cat([fill(prev, count, dtype), fill(prev, count, dtype, offset=5)])


@pytest.mark.parametrize("n", [2, 3])
def test_every_op_every_dtype_matches_the_reference(run, n):
    results = run(_all_ops, n, groups=[tuple(range(n)), tuple(range(1, n))])
    for rank, got in enumerate(results):
        assert len(got) == (6 if rank >= 1 else 4) * len(DTYPES) * len(COUNTS)
        for (op, dtype_name, count), tensor in got.items():
            dtype = next(d for d in DTYPES if str(d) == dtype_name)
            expected = _reference(rank, n, op, dtype, count)
            assert tensor.dtype == dtype and torch.equal(tensor, expected), (run.backend, rank, op, dtype, count)


# -- the protocol and its groups ------------------------------------------------------------------

def _protocol(t, rank_: Rank):
    h = t.send(rank_.put(t, torch.ones(2)), 1 - t.rank) if t.rank == 0 else t.recv(rank_.empty(t, 2, torch.float32), 0)
    h.synchronize()
    with t as same:
        entered = same is t
    return isinstance(t, Transport), isinstance(h, Handle), h.is_completed(), entered, t.world_size


def test_protocol_shape(run):
    assert run(_protocol, 2) == [(True, True, True, True, 2)] * 2


def _group_block(t, rank_: Rank):
    peer = 1 - t.rank
    bufs = [rank_.put(t, torch.full((3,), float(t.rank + i))) for i in range(3)]
    out = [rank_.empty(t, 3, torch.float32) for _ in range(3)]
    with t.group():
        hs = [t.send(b, peer, name=f"act{i}") for i, b in enumerate(bufs)]
        hs += [t.recv(o, peer, name=f"act{i}") for i, o in enumerate(out)]
    for h in hs:
        h.synchronize()
    return [float(Rank.get(o)[0]) for o in out]


def test_group_block_issues_its_ops_and_they_complete_after_it(run):
    assert run(_group_block, 2) == [[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]]


# -- failures ---------------------------------------------------------------------------------------

def _silent_peer(t, rank_: Rank):
    """Rank 1 joined but never sends; rank 0's synchronize is bounded well below the timeout."""
    result = None
    if t.rank == 0:
        h = t.recv(rank_.empty(t, 3, torch.float32), 1, name="mb9")
        assert not h.is_completed()
        start = time.monotonic()
        with pytest.raises(TransportError) as info:
            h.synchronize(0.5)
        result = str(info.value), time.monotonic() - start
    rank_.meet()  # rank 1 stays until rank 0 is done
    return result


def test_synchronize_names_the_silent_peer_within_its_bound(run):
    text, elapsed = run(_silent_peer, 2, timeout_s=30)[0]
    assert "recv 'mb9' (rank 0, peer 1" in text and "timed out" in text, text
    assert 0.4 <= elapsed < 10


def _abort_then_wait(t, rank_: Rank):
    result = None
    if t.rank == 0:
        h = t.recv(rank_.empty(t, 3, torch.float32), 1, name="mb4")
        t.abort()
        t.abort()  # idempotent
        start = time.monotonic()
        with pytest.raises(TransportError) as pending:
            h.synchronize()
        elapsed = time.monotonic() - start
        with pytest.raises(TransportError) as late:
            t.send(rank_.put(t, torch.ones(1)), 1, name="late").synchronize(5)
        result = str(pending.value), elapsed, str(late.value)
    rank_.meet()
    return result


def test_abort_fails_pending_waits_at_once_and_later_ops(run):
    pending, elapsed, late = run(_abort_then_wait, 2, timeout_s=30)[0]
    assert "recv 'mb4' (rank 0, peer 1" in pending and "abort" in pending, pending
    assert elapsed < 2.0
    assert "'late'" in late and "abort" in late, late


def _bad_arguments(t, rank_: Rank):
    refusals = []
    for call, words in [] if t.rank else [
        (lambda: t.all_reduce(rank_.put(t, torch.ones(2)), (1, 2)), "not a member"),
        (lambda: t.reduce_scatter(rank_.empty(t, 1, torch.float32), rank_.put(t, torch.ones(4)), (0, 1, 2)),
         "split evenly"),
        (lambda: t.send(rank_.put(t, torch.ones(2)), 5), "outside"),
        (lambda: t.send(rank_.put(t, torch.ones(4, 4).T), 1), "contiguous"),  # put keeps the strides
    ]:
        with pytest.raises(TransportError, match=words):
            call()
        refusals.append(words)
    rank_.meet()
    return refusals


def test_bad_arguments_are_refused_before_anything_is_issued(run):
    got = run(_bad_arguments, 3, groups=[(1, 2)])
    assert got[0] == ["not a member", "split evenly", "outside", "contiguous"]
