"""local transport: N virtual ranks (threads) in one process; CPU here, CUDA under the gpu
marker. Same ops and references as the gloo tests."""

import threading
import time

import gpu_sleep
import pytest
import torch

from pyengine.transport import LocalTransport, TransportError

DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int32)
COUNTS = (1, 1023)  # a single element; an odd count


def fill(rank, count, dtype, device="cpu", offset=0):
    """Small integers: every sum below is exact in every dtype tested."""
    return ((torch.arange(count) + offset) * 7 + rank * 3).remainder(11).to(dtype).to(device)


def run_ranks(transports, body, timeout_s=30.0):
    """Runs body(transport) on one thread per virtual rank; re-raises the first error."""
    results, errors = [None] * len(transports), {}

    def target(t):
        try:
            if t.device.type == "cuda":
                torch.cuda.set_device(t.device)
            results[t.rank] = body(t)
        except BaseException as exc:  # re-raised in the test thread
            errors[t.rank] = exc

    threads = [threading.Thread(target=target, args=(t,), daemon=True) for t in transports]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout_s)
    assert not any(th.is_alive() for th in threads), "a virtual rank hung"
    if errors:
        raise errors[min(errors)]
    return results


def _all_ops(t):
    n, rank, dev = t.world_size, t.rank, t.device
    world, sub = tuple(range(n)), tuple(range(1, n))
    out = {}
    for dtype in DTYPES:
        for count in COUNTS:
            key = (dtype, count)
            x = fill(rank, count, dtype, dev)
            t.all_reduce(x, world, name="ar").wait()
            out[("all_reduce",) + key] = x
            chunk = torch.empty(count, dtype=dtype, device=dev)
            t.reduce_scatter(chunk, fill(rank, count * n, dtype, dev), world, name="rs").wait()
            out[("reduce_scatter",) + key] = chunk
            b = fill(rank, count, dtype, dev)
            t.broadcast(b, n - 1, world, name="bc").wait()
            out[("broadcast",) + key] = b
            s1, s2 = fill(rank, count, dtype, dev), fill(rank, count, dtype, dev, offset=5)
            r1, r2 = (torch.empty(count, dtype=dtype, device=dev) for _ in range(2))
            hs = [t.send(s1, (rank + 1) % n), t.send(s2, (rank + 1) % n),
                  t.recv(r1, (rank - 1) % n), t.recv(r2, (rank - 1) % n)]
            for h in hs:
                h.wait()
            out[("sendrecv",) + key] = torch.cat([r1, r2])
            if rank in sub:
                y = fill(rank, count, dtype, dev)
                t.all_reduce(y, sub, name="ar_sub").wait()
                out[("all_reduce_sub",) + key] = y
    t.barrier()
    if dev.type == "cuda":
        torch.cuda.current_stream(dev).synchronize()
    return {k: v.cpu() for k, v in out.items()}


def _reference(rank, n, op, dtype, count):
    if op == "all_reduce":
        return sum(fill(r, count, torch.int64) for r in range(n)).to(dtype)
    if op == "all_reduce_sub":
        return sum(fill(r, count, torch.int64) for r in range(1, n)).to(dtype)
    if op == "reduce_scatter":
        full = sum(fill(r, count * n, torch.int64) for r in range(n))
        return full[rank * count:(rank + 1) * count].to(dtype)
    if op == "broadcast":
        return fill(n - 1, count, dtype)
    prev = (rank - 1) % n
    return torch.cat([fill(prev, count, dtype), fill(prev, count, dtype, offset=5)])


def _check_all(results, n):
    for rank, got in enumerate(results):
        assert len(got) == (5 if rank >= 1 else 4) * len(DTYPES) * len(COUNTS)
        for (op, dtype, count), tensor in got.items():
            assert torch.equal(tensor, _reference(rank, n, op, dtype, count)), (rank, op, dtype, count)


@pytest.mark.parametrize("n", [2, 3])
def test_every_op_every_dtype_cpu(n):
    _check_all(run_ranks(LocalTransport.create(n, "cpu", timeout_s=10), _all_ops), n)


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

    assert run_ranks(ts, body)[:2] == [True, True]


def test_mismatched_collectives_are_reported():
    ts = LocalTransport.create(2, "cpu", timeout_s=2)

    def body(t):
        x = torch.ones(3)
        h = t.all_reduce(x, (0, 1)) if t.rank == 0 else t.broadcast(x, 0, (0, 1))
        with pytest.raises(TransportError, match="mismatched collectives"):
            h.wait()

    run_ranks(ts, body)


def test_size_mismatch_is_reported_to_both_sides():
    ts = LocalTransport.create(2, "cpu", timeout_s=2)
    hs = ts[0].send(torch.ones(3), 1), ts[1].recv(torch.empty(4), 0)
    for h in hs:
        with pytest.raises(TransportError, match="size/dtype mismatch"):
            h.wait()


def test_protocol_includes_synchronize_abort_and_group():
    from pyengine.transport import Handle, Transport

    ts = LocalTransport.create(2, "cpu", timeout_s=2)
    assert isinstance(ts[0], Transport)
    h = ts[0].send(torch.ones(2), 1)
    assert isinstance(h, Handle)
    ts[1].recv(torch.empty(2), 0).synchronize()
    h.synchronize()
    assert h.is_completed()


def test_synchronize_names_a_peer_that_never_sends_within_the_timeout():
    ts = LocalTransport.create(3, "cpu", timeout_s=30)
    h = ts[0].recv(torch.empty(4), 2, name="mb3")
    start = time.monotonic()
    with pytest.raises(TransportError, match=r"local recv 'mb3' \(rank 0, peer 2\) timed out after "
                                             r"0.3 s: peer 2 never issued the matching send"):
        h.synchronize(0.3)
    assert 0.3 <= time.monotonic() - start < 2
    assert not h.is_completed()


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


def test_group_block_issues_ops_and_handles_complete_after_it():
    ts = LocalTransport.create(2, "cpu", timeout_s=5)

    def body(t):
        bufs = [torch.full((3,), float(t.rank + i)) for i in range(3)]
        out = [torch.empty(3) for _ in range(3)]
        with t.group():
            hs = [t.send(b, 1 - t.rank, name=f"act{i}") for i, b in enumerate(bufs)]
            hs += [t.recv(o, 1 - t.rank, name=f"act{i}") for i, o in enumerate(out)]
        for h in hs:
            h.synchronize()
        return [float(o[0]) for o in out]

    assert run_ranks(ts, body) == [[1.0, 2.0, 3.0], [0.0, 1.0, 2.0]]


def test_bad_arguments():
    t = LocalTransport.create(3, "cpu")[0]
    with pytest.raises(TransportError, match="not a member"):
        t.all_reduce(torch.ones(2), (1, 2))
    with pytest.raises(TransportError, match="split evenly"):
        t.reduce_scatter(torch.empty(1), torch.ones(4), (0, 1, 2))
    with pytest.raises(TransportError, match="outside"):
        t.send(torch.ones(2), 5)
    with pytest.raises(TransportError, match="contiguous"):
        t.send(torch.ones(4, 4).T, 1)


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_every_op_three_virtual_ranks_on_one_gpu():
    _check_all(run_ranks(LocalTransport.create(3, "cuda", timeout_s=30), _all_ops), 3)


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

    assert run_ranks(ts, body)[1] == (6.0, 6.0)


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

    assert run_ranks(ts, body)[1] == 7.0


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

    assert run_ranks(ts, body) == [(3.0, 3.0), (3.0, 3.0)]
