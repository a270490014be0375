"""local transport: N virtual ranks (threads) in one process; CPU here, CUDA under the gpu
marker. What only the local transport does: it names the peer or member that never issued the
matching op, reports mismatched collectives and sizes to both sides, keeps ranks that did not
abort talking, and orders the CUDA streams of virtual ranks. Every op, the protocol, groups,
bad arguments, a silent peer and abort: the transport contract (test_transport_contract.py)."""

import threading
import time

import gpu_sleep
import pytest
import torch

from helpers import on_threads
from pyengine.transport import LocalTransport, TransportError

def on_ranks(transports, body):
    """body(transport) on one thread per virtual rank; results in rank order."""
    def run(rank):
        t = transports[rank]
        if t.device.type == "cuda":
            torch.cuda.set_device(t.device)
        return body(t)

    return on_threads(run, len(transports), timeout_s=30)


def test_protocol_attributes():
    ts = LocalTransport.create(3, "cpu")
    assert [t.rank for t in ts] == [0, 1, 2]
    assert all(t.world_size == 3 and t.name == "local" and t.device == torch.device("cpu") for t in ts)
    with ts[0] as t:
        assert t is ts[0]
    with pytest.raises(TransportError, match="closed"):
        ts[0].send(torch.zeros(1), 1)


def test_missing_peer_recv_times_out_naming_it():
    ts = LocalTransport.create(3, "cpu", timeout_s=0.5)
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"local recv 'mb3' \(rank 0, peer 2\) timed out.*"
                                             r"peer 2 never issued the matching send"):
        ts[0].recv(torch.empty(4), 2, name="mb3").wait()
    assert time.monotonic() - start < 2


def test_missing_peer_send_times_out_naming_it():
    ts = LocalTransport.create(3, "cpu", timeout_s=0.5)
    h = ts[1].send(torch.ones(4), 2, name="act")
    assert not h.is_completed()
    with pytest.raises(TransportError, match=r"peer 2 never issued the matching recv"):
        h.wait()


def test_missing_member_of_collective_is_named():
    ts = LocalTransport.create(3, "cpu", timeout_s=0.5)

    def body(t):
        if t.rank == 2:
            return None  # never shows up
        with pytest.raises(TransportError, match=r"all_reduce 'y'.*rank\(s\) \[2\] never issued it"):
            t.all_reduce(torch.ones(3), (0, 1, 2), name="y").wait()
        return True

    assert on_ranks(ts, body)[:2] == [True, True]


def test_mismatched_collectives_are_reported():
    ts = LocalTransport.create(2, "cpu", timeout_s=2)

    def body(t):
        x = torch.ones(3)
        h = t.all_reduce(x, (0, 1)) if t.rank == 0 else t.broadcast(x, 0, (0, 1))
        with pytest.raises(TransportError, match="mismatched collectives"):
            h.wait()

    on_ranks(ts, body)


def test_size_mismatch_is_reported_to_both_sides():
    ts = LocalTransport.create(2, "cpu", timeout_s=2)
    hs = ts[0].send(torch.ones(3), 1), ts[1].recv(torch.empty(4), 0)
    for h in hs:
        with pytest.raises(TransportError, match="size/dtype mismatch"):
            h.wait()


def test_synchronize_names_the_missing_member_of_a_collective():
    ts = LocalTransport.create(3, "cpu", timeout_s=30)
    hs = [t.all_reduce(torch.ones(2), (0, 1, 2), name="tp") for t in ts[:2]]
    with pytest.raises(TransportError, match=r"local all_reduce 'tp' \(rank 1, group \(0, 1, 2\)\) "
                                             r"timed out.*rank\(s\) \[2\] never issued it"):
        hs[1].synchronize(0.2)


def test_abort_fails_the_peers_pending_waits_at_once():
    """rank 0 blocks in wait() on a recv from rank 2; rank 2 aborts: rank 0's wait raises
    naming it immediately instead of after the 30 s timeout."""
    ts = LocalTransport.create(3, "cpu", timeout_s=30)
    h = ts[0].recv(torch.empty(4), 2, name="mb5")
    coll = ts[1].all_reduce(torch.ones(2), (1, 2), name="tp")
    timer = threading.Timer(0.2, ts[2].abort)
    timer.start()
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"local recv 'mb5' \(rank 0, peer 2\) failed: "
                                             r"rank\(s\) \[2\] aborted their transport"):
        h.wait()
    assert time.monotonic() - start < 5
    with pytest.raises(TransportError, match=r"all_reduce 'tp'.*failed: rank\(s\) \[2\] aborted"):
        coll.synchronize()
    assert not coll.is_completed()
    # ops issued later that involve the aborted rank fail at once, on every rank
    with pytest.raises(TransportError, match=r"aborted their transport"):
        ts[1].send(torch.ones(1), 2, name="late").synchronize(10)
    with pytest.raises(TransportError, match="aborted"):
        ts[2].send(torch.ones(1), 0)
    ts[2].abort()  # idempotent
    # ranks that did not abort still talk to each other
    a, b = ts[0].send(torch.ones(3), 1), ts[1].recv(torch.zeros(3), 0)
    a.synchronize(5)
    b.synchronize(5)


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_wait_orders_the_current_stream():
    """Data produced on the sender's current stream just before send() arrives intact, and
    the receiver's current stream sees it after Handle.wait() without a host sync."""
    ts = LocalTransport.create(2, "cuda", timeout_s=30)
    n = 1 << 22

    def body(t):
        if t.rank == 0:
            x = torch.zeros(n, device="cuda")
            torch.cuda._sleep(20_000_000)  # the producer kernel is still queued at send()
            x.add_(3.0)
            t.send(x, 1).wait()
            return None
        y = torch.empty(n, device="cuda")
        t.recv(y, 0).wait()
        z = y * 2  # on the current stream, ordered after the copy by the handle
        return float(z.min().item()), float(z.max().item())

    assert on_ranks(ts, body)[1] == (6.0, 6.0)


@pytest.mark.gpu
def test_gpu_synchronize_waits_for_the_device_copy_within_its_bound():
    """The copy runs after the sender's current stream (busy ~1 s): synchronize with a short
    bound names the op; with a long one it returns once the copy ran."""
    rate = gpu_sleep.cycles_per_s()
    ts = LocalTransport.create(2, "cuda", timeout_s=30)

    def body(t):
        if t.rank == 0:
            x = torch.full((1024,), 7.0, device="cuda")
            gpu_sleep.sleep_on(None, 1.0, rate)  # the producer is still running at send()
            t.send(x, 1, name="act").synchronize(20)
            return None
        y = torch.zeros(1024, device="cuda")
        h = t.recv(y, 0, name="act")
        h.wait(20)  # both sides issued: the copy is queued behind rank 0's kernel
        with pytest.raises(TransportError, match=r"local recv 'act' \(rank 1, peer 0\) timed out "
                                                 r"after 0.2 s: its copy/sum was issued but did "
                                                 r"not finish on the device"):
            h.synchronize(0.2)
        h.synchronize(20)
        assert h.is_completed()
        return float(y.min())

    assert on_ranks(ts, body)[1] == 7.0


@pytest.mark.gpu
def test_cupy_arrays_through_local_transport():
    cp = pytest.importorskip("cupy")
    ts = LocalTransport.create(2, "cuda", timeout_s=30)

    def body(t):
        x = cp.full(1023, t.rank + 1, dtype=cp.float32)
        cp.cuda.Device().synchronize()
        t.all_reduce(x, (0, 1)).wait()
        torch.cuda.current_stream().synchronize()
        return float(x.min()), float(x.max())

    assert on_ranks(ts, body) == [(3.0, 3.0), (3.0, 3.0)]
