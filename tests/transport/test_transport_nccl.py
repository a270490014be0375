"""nccl transport: argument checks on CPU; a 1-rank transport on one GPU (gpu marker);
2- and 3-rank runs (one process per GPU) when the machine has that many GPUs."""

import datetime
import time

import gpu_sleep
import pytest
import torch
import torch.distributed as dist

from pyengine.execute.procs import RankFailure, spawn_ranks
from pyengine.transport.store import connect_store
from pyengine.transport import Handle, Transport, TransportError, create_transport
from pyengine.transport.nccl import nccl_dtype


def test_dtype_mapping():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64,
                  torch.uint8, torch.float64):
        assert nccl_dtype(dtype).name == str(dtype).removeprefix("torch.")
    with pytest.raises(TransportError, match="not supported"):
        nccl_dtype(torch.complex64)


def test_needs_a_cuda_device():
    with pytest.raises(TransportError, match="needs a CUDA device"):
        create_transport("nccl", rank=0, world_size=1, device="cpu", groups=[], store=dist.HashStore())


def test_unknown_backend_and_local_hint():
    with pytest.raises(TransportError, match="unknown transport backend"):
        create_transport("mpi", rank=0, world_size=1, device=None, groups=[])
    with pytest.raises(TransportError, match="LocalTransport.create"):
        create_transport("local", rank=0, world_size=1, device=None, groups=[])


def test_missing_store_env_is_explained(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(TransportError, match="MASTER_ADDR is not set"):
        create_transport("gloo", rank=0, world_size=1, device=None, groups=[])


# -- GPU ------------------------------------------------------------------------------------------

def _one_rank():
    return create_transport("nccl", rank=0, world_size=1, device=0, groups=[(0,)],
                            store=dist.HashStore(), timeout_s=30)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("count", [1, 1023])
def test_one_rank_collectives(dtype, count):
    with _one_rank() as tr:
        assert (tr.name, tr.rank, tr.world_size, tr.device) == ("nccl", 0, 1, torch.device("cuda", 0))
        x = torch.arange(count, device="cuda").to(dtype)
        expected = x.clone()
        tr.all_reduce(x, (0,), name="ar").wait()
        out = torch.empty_like(x)
        tr.reduce_scatter(out, x, (0,), name="rs").wait()
        h = tr.broadcast(x, 0, (0,), name="bc")
        h.wait()
        h.synchronize(10)
        assert h.is_completed()
        assert torch.equal(x, expected) and torch.equal(out, expected)
        tr.barrier()


@pytest.mark.gpu
def test_one_rank_send_to_self_in_a_group():
    with _one_rank() as tr:
        assert isinstance(tr, Transport)
        assert list(tr.streams) == [(0,)]  # one comm stream per communicator
        src = torch.arange(1023, dtype=torch.float16, device="cuda")
        dst = torch.zeros_like(src)
        with tr.group():
            hs = [tr.send(src, 0, name="self"), tr.recv(dst, 0, name="self")]
            for h in hs:  # not launched yet: nothing to complete or wait on
                assert isinstance(h, Handle)
                assert not h.is_completed() and h.events is None
                with pytest.raises(TransportError, match=r"wait\(\) inside the transport.group"):
                    h.wait()
                with pytest.raises(TransportError, match=r"synchronize\(\) inside"):
                    h.synchronize(1)
        for h in hs:
            h.wait()
            h.synchronize(10)
            assert h.is_completed() and h.events is not None
        assert torch.equal(src, dst)


@pytest.mark.gpu
def test_group_body_error_still_closes_the_nccl_group():
    from pyengine._native import native

    with _one_rank() as tr:
        x = torch.ones(8, device="cuda")
        with pytest.raises(ValueError, match="body"):
            with tr.group():
                tr.all_reduce(x, (0,), name="in_group")
                raise ValueError("body")
        assert native().group_depth() == 0
        tr.all_reduce(x, (0,), name="after").synchronize(10)


@pytest.mark.gpu
def test_synchronize_times_out_names_the_op_and_aborts_every_communicator():
    """The op cannot start (its comm stream waits for a long kernel on the caller's stream):
    synchronize raises after its timeout with the op, action name, global rank and NCCL's
    text, having aborted the rank's communicators; later ops fail fast."""
    rate = gpu_sleep.cycles_per_s()
    tr = _one_rank()
    x = torch.ones(1024, device="cuda")
    gpu_sleep.sleep_on(None, 1.5, rate)  # on the current stream, before the op
    h = tr.all_reduce(x, (0,), name="mb2.tp")
    start = time.monotonic()
    with pytest.raises(TransportError) as info:
        h.synchronize(0.2)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "NCCL all_reduce 'mb2.tp' (rank 0, group (0,), device 0) timed out after 0.2 s" in text
    assert "NCCL reports:" in text and "aborted every NCCL communicator of rank 0" in text
    assert 0.2 <= elapsed < 1.5 + 2.0, elapsed
    with pytest.raises(TransportError, match="the communicator was aborted"):
        tr.all_reduce(x, (0,), name="after")
    tr.abort()  # idempotent
    tr.close()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_abort_inside_a_group_block_happens_when_it_ends():
    tr = _one_rank()
    x = torch.ones(8, device="cuda")
    with tr.group():
        tr.all_reduce(x, (0,), name="g")
        tr.abort()
        assert tr._comms[(0,)].alive  # NCCL's open group still refers to it
    assert not tr._comms[(0,)].alive
    with pytest.raises(TransportError, match="the communicator was aborted"):
        tr.all_reduce(x, (0,), name="after")
    tr.close()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_abort_then_ops_fail_fast():
    tr = _one_rank()
    tr.abort(5.0)
    with pytest.raises(TransportError, match=r"NCCL send 'x' \(rank 0, peer 0, group \(0,\), "
                                             r"device 0\): the communicator was aborted"):
        tr.send(torch.ones(4, device="cuda"), 0, name="x")
    tr.close()


# -- several GPUs: one process per GPU --------------------------------------------------------

def _gpus(n):
    return pytest.mark.skipif(torch.cuda.device_count() < n, reason=f"needs {n} GPUs")


def _nccl(rank, nranks, port, groups, timeout_s=30):
    store = connect_store(rank, nranks, port, timeout_s=30)
    return create_transport("nccl", rank=rank, world_size=nranks, device=rank, groups=groups,
                            store=store, timeout_s=timeout_s)


def _reduce_then_send(rank, nranks, port):
    """The pipeline's pattern: experts (1, 2) all_reduce their partials on the (1, 2)
    communicator, then rank 1 sends the reduced tensor to rank 0 on the world communicator.
    The transport orders them only through the caller's stream (h.wait())."""
    with _nccl(rank, nranks, port, [(0, 1, 2), (1, 2)]) as tr:
        assert len(tr.streams) == (1 if rank == 0 else 2)
        out = torch.empty(4096, device="cuda")
        if rank == 0:
            tr.recv(out, 1, name="mb0.partial").synchronize()
            tr.barrier()
            return float(out.min()), float(out.max())
        part = torch.full((4096,), float(rank), device="cuda")
        torch.cuda._sleep(50_000_000)  # the partial is produced late
        h = tr.all_reduce(part, (1, 2), name="mb0.tp")
        h.wait()
        if rank == 1:
            with tr.group():  # one group: the three tensors of an activation would go here
                s = tr.send(part, 0, name="mb0.partial")
            s.synchronize()
        tr.barrier()
        return None


@pytest.mark.gpu
@_gpus(3)
def test_reduce_on_subgroup_then_send_on_world():
    results = spawn_ranks(_reduce_then_send, 3, timeout_s=120)
    assert results[0] == (3.0, 3.0)


def _stuck_subgroup_then_abort(rank, nranks, port):
    """Rank 2 never joins the all_reduce on (1, 2) and rank 0 never receives rank 1's send
    on the world communicator, so rank 1 has a stuck op on each of its two communicators.
    Its synchronize times out and aborts both together; that must return (aborting one while
    the other's op was stuck behind it on a shared stream never did)."""
    tr = _nccl(rank, nranks, port, [(0, 1, 2), (1, 2)], timeout_s=60)
    if rank != 1:
        tr.store.wait(["rank1-done"], datetime.timedelta(seconds=80))
        tr.abort(10)
        return None
    h = tr.all_reduce(torch.ones(1 << 20, device="cuda"), (1, 2), name="mb1.tp")
    tr.send(torch.ones(4, device="cuda"), 0, name="mb1.other")
    start = time.monotonic()
    try:
        h.synchronize(2.0)
        text = "no error"
    except TransportError as exc:
        text = str(exc)
    elapsed = time.monotonic() - start
    tr.store.set("rank1-done", b"1")
    return elapsed, text


@pytest.mark.gpu
@_gpus(3)
def test_stuck_ops_on_two_communicators_abort_together_in_bounded_time():
    elapsed, text = spawn_ranks(_stuck_subgroup_then_abort, 3, timeout_s=120)[1]
    assert "NCCL all_reduce 'mb1.tp' (rank 1, group (1, 2), device 1) timed out after 2 s" in text
    assert "aborted every NCCL communicator of rank 1 (group (0, 1, 2), group (1, 2))" in text
    assert "did not return" not in text, text
    assert 2.0 <= elapsed < 2.0 + 20.0, (elapsed, text)


def _silent_peer(rank, nranks, port):
    tr = _nccl(rank, nranks, port, [])
    if rank == 1:
        time.sleep(3600)
    h = tr.recv(torch.empty(16, device="cuda"), 1, name="mb7")
    h.synchronize(2.0)


@pytest.mark.gpu
@_gpus(2)
def test_synchronize_names_a_silent_peer_in_global_ranks():
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_silent_peer, 2, timeout_s=90)
    text = str(info.value)
    assert info.value.rank == 0, text
    assert "NCCL recv 'mb7' (rank 0, peer 1, group (0, 1), device 0) timed out after 2 s" in text
    assert "aborted every NCCL communicator of rank 0" in text
    assert time.monotonic() - start < 60


@pytest.mark.gpu
def test_handle_wait_orders_current_stream_without_host_sync():
    with _one_rank() as tr:
        x = torch.zeros(1 << 22, device="cuda")
        torch.cuda._sleep(20_000_000)  # x is produced late on the current stream
        x.add_(2.0)
        h = tr.all_reduce(x, (0,), name="late")
        h.wait()
        y = x * 3  # ordered after the all_reduce by the handle
        assert float(y.min()) == 6.0


@pytest.mark.gpu
def test_cupy_arrays_through_nccl_transport():
    cp = pytest.importorskip("cupy")
    with _one_rank() as tr:
        x = cp.arange(1023, dtype=cp.float32)
        cp.cuda.Device().synchronize()
        tr.all_reduce(x, (0,), name="cupy").synchronize(10)
        assert bool((x == cp.arange(1023, dtype=cp.float32)).all())
