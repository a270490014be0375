"""NcclTransport's own logic on CPU, against a fake pyengine._C and fake CUDA streams/events:
one comm stream per communicator, the order of calls (ready event -> op -> completion event),
group semantics (handles incomplete inside the block, every op recorded at its end, failures),
synchronize's error path, abort, the init-time connection of every peer and communicator,
and local/global rank mapping (the fakes: fake_nccl.py). The transport contract every backend
keeps (data, timeouts, abort) runs over it in test_transport_contract.py. What NCCL and CUDA do
is covered by the gpu-marked tests."""

from __future__ import annotations

import pytest
import torch.distributed as dist

import pyengine.transport.nccl as nccl_mod
from fake_nccl import FakeC, FakeTensor, install
from pyengine.transport import Handle, Transport, TransportError

@pytest.fixture
def fake(monkeypatch):
    C = FakeC()
    install(monkeypatch, C)
    return C


def make(fake, rank=1, world=3, groups=((0, 1, 2), (1, 2)), connect=True):
    store = dist.HashStore()
    for index in range(len(groups) + 1):  # the unique ids the first member of each would publish
        store.set(f"pyengine/nccl/{index}", b"x" * 128)
    return nccl_mod.NcclTransport(rank=rank, world_size=world, device=rank, groups=groups,
                                  store=store, timeout_s=7.0, connect=connect)


def ops(fake, kinds=("send", "recv", "all_reduce", "broadcast", "reduce_scatter")):
    return [e for e in fake.log if e[0] in kinds]


def test_one_stream_per_communicator_and_all_in_one_set(fake):
    tr = make(fake, connect=False)
    assert isinstance(tr, Transport)
    assert list(tr.streams) == [(0, 1, 2), (1, 2)]
    s_world, s_tp = (tr.streams[g].cuda_stream for g in [(0, 1, 2), (1, 2)])
    assert s_world != s_tp
    assert [m.ranks for m in fake.sets[0].members] == [[0, 1, 2], [1, 2]]
    assert ("init", (1, 2)) in fake.log  # global ranks handed to the communicator


def test_an_op_waits_for_the_callers_stream_then_records_its_completion(fake):
    tr = make(fake, connect=False)
    fake.log.clear()
    x = FakeTensor()
    h = tr.all_reduce(x, (1, 2), name="mb0.tp")
    stream = tr.streams[(1, 2)].cuda_stream
    (rec_ready, wait_ready, op, rec_done) = fake.log
    assert rec_ready[0] == "record" and rec_ready[2] == fake.current.cuda_stream
    assert wait_ready == ("stream_waits", stream, rec_ready[1])
    assert op == ("all_reduce", (1, 2), None, stream, "mb0.tp", 0) and rec_done[2] == stream
    assert x.recorded_streams == [tr.streams[(1, 2)]]
    assert isinstance(h, Handle) and h.events is not None
    assert not h.is_completed()
    fake.done.add(rec_done[1])
    assert h.is_completed()
    fake.log.clear()
    h.wait()
    assert fake.log == [("stream_waits", fake.current.cuda_stream, rec_done[1])]


def test_p2p_uses_the_world_communicator_and_broadcast_maps_the_root(fake):
    tr = make(fake, connect=False)
    fake.log.clear()
    tr.send(FakeTensor(), 0, name="act")
    tr.broadcast(FakeTensor(), 2, (1, 2), name="bc")
    assert ("send", (0, 1, 2), 0, tr.streams[(0, 1, 2)].cuda_stream, "act", 0) in fake.log
    # global rank 2 is index 1 of (1, 2): NCCL gets the local root
    assert ("broadcast", (1, 2), 1, tr.streams[(1, 2)].cuda_stream, "bc", 0) in fake.log


def test_group_handles_complete_only_after_the_block(fake):
    tr = make(fake, connect=False)
    fake.log.clear()
    with tr.group():
        hs = [tr.send(FakeTensor(), 0, name=n) for n in ("u", "ids", "w")]
        hs.append(tr.all_reduce(FakeTensor(), (1, 2), name="tp"))
        assert all(e[-1] == 1 for e in ops(fake))  # issued inside NCCL's group
        for h in hs:
            assert not h.is_completed() and h.events is None
            with pytest.raises(TransportError, match=r"wait\(\) inside the transport.group"):
                h.wait()
            with pytest.raises(TransportError, match=r"synchronize\(\) inside"):
                h.synchronize()
        assert not [e for e in fake.log if e[0] == "record" and e[2] != fake.current.cuda_stream]
    end = fake.log.index(("group_end",))
    done = [e for e in fake.log[end:] if e[0] == "record"]
    assert [d[2] for d in done] == [tr.streams[(0, 1, 2)].cuda_stream] * 3 + [tr.streams[(1, 2)].cuda_stream]
    assert all(h.events is not None for h in hs)


def test_group_end_failure_fails_its_handles(fake):
    tr = make(fake, connect=False)
    fake.group_end_error = "NCCL group_end failed: boom; aborted every NCCL communicator of rank 1"
    with pytest.raises(TransportError, match=r"nccl group on rank 1 \(nccl send 'u' \(rank 1, "
                                             r"peer 0\)\) failed: NCCL group_end failed: boom"):
        with tr.group():
            h = tr.send(FakeTensor(), 0, name="u")
    with pytest.raises(TransportError, match="failed with the group that issued it: NCCL group_end"):
        h.synchronize()
    assert not h.is_completed()


def test_group_body_error_ends_the_group_and_stays_the_error(fake):
    tr = make(fake, connect=False)
    with pytest.raises(ValueError, match="body") as info:
        with tr.group():
            h = tr.send(FakeTensor(), 0, name="u")
            raise ValueError("body")
    assert fake.depth == 0 and h.events is not None  # what was issued got launched
    fake.group_end_error = "boom"
    with pytest.raises(KeyError) as info:
        with tr.group():
            raise KeyError("k")
    assert any("ending the NCCL group (rank 1) failed too: boom" in n for n in info.value.__notes__)
    with pytest.raises(TransportError, match="groups do not nest"):
        with tr.group():
            with tr.group():
                pass


def test_synchronize_translates_the_error_after_the_set_was_aborted(fake):
    tr = make(fake, connect=False)
    h = tr.recv(FakeTensor(), 2, name="mb3")
    fake.wait_error = "NCCL recv 'mb3' (rank 1, peer 2, group (0, 1, 2), device 1) timed out"
    with pytest.raises(TransportError, match=r"NCCL recv 'mb3' \(rank 1, peer 2"):
        h.synchronize(0.5)
    assert ("wait", (0, 1, 2), "recv", "mb3", 2, 0.5) in fake.log
    assert fake.sets[0].aborts == 1
    with pytest.raises(TransportError, match="aborted"):
        tr.send(FakeTensor(), 2, name="late")


def test_abort_and_close(fake):
    tr = make(fake, connect=False)
    tr.abort(3.0)
    assert ("abort_set", 3.0) in fake.log
    tr.abort()
    assert ("abort_set", 7.0) in fake.log  # default bound: the transport's timeout
    tr2 = make(fake, connect=False)
    tr2.close()
    assert [e for e in fake.log if e[0] == "destroy"][-2:] == [("destroy", (1, 2)), ("destroy", (0, 1, 2))]


def test_init_connects_every_peer_then_every_communicator(fake):
    make(fake, rank=1)
    issued = ops(fake)
    p2p, colls = issued[:4], issued[4:]
    assert sorted((e[0], e[2]) for e in p2p) == [("recv", 0), ("recv", 2), ("send", 0), ("send", 2)]
    assert all(e[-1] == 1 and e[4] == "connect" for e in p2p)  # in one group
    assert [(e[0], e[1]) for e in colls] == [("all_reduce", (0, 1, 2)), ("all_reduce", (1, 2))]
    assert sum(1 for e in fake.log if e[0] == "wait") == 6  # every connect op synchronised
    fake.log.clear()
    make(fake, rank=0)
    assert [(e[0], e[1]) for e in ops(fake, ("all_reduce",))] == [("all_reduce", (0, 1, 2))]
