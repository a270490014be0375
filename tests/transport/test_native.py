"""pyengine._C: import, versions, clear errors without a driver, the wait loop, thread-wide
NCCL groups (CPU); streams, events and 1-rank NCCL communicators (GPU)."""

import threading
import time

import gpu_sleep
import pytest
import torch

from pyengine._native import native

C = native()

no_driver = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver error path")


def test_module_imports_and_registers_everything():
    for name in ("Error", "Stream", "Event", "Communicator", "CommSet", "DType", "RedOp",
                 "dtype_size", "group_start", "group_end", "group_depth", "_poll_overhead",
                 "nccl_version", "cuda_runtime_version", "driver_version", "device_count"):
        assert hasattr(C, name), name
    assert issubclass(C.Error, RuntimeError)


def test_versions():
    major, minor, patch = C.nccl_version()
    assert (major, minor) >= (2, 19)
    assert C.cuda_runtime_version()[0] >= 12
    assert C.driver_version() >= 0


def test_enums_and_sizes():
    sizes = {"float32": 4, "float16": 2, "bfloat16": 2, "int32": 4, "int64": 8, "uint8": 1, "float64": 8}
    for name, size in sizes.items():
        assert C.dtype_size(getattr(C.DType, name)) == size
    assert {op.name for op in (C.RedOp.sum, C.RedOp.max, C.RedOp.min, C.RedOp.prod)} == {
        "sum", "max", "min", "prod"}


def test_unique_id_needs_no_gpu():
    # ncclGetUniqueId only opens NCCL's bootstrap socket on the host: works without a driver.
    a, b = C.Communicator.unique_id(), C.Communicator.unique_id()
    assert isinstance(a, bytes) and len(a) == 128
    assert a != b


def test_communicator_rejects_bad_arguments_before_touching_cuda():
    with pytest.raises(C.Error, match="unique_id must be 128 bytes"):
        C.Communicator(b"short", 1, 0, 0, 1.0)
    with pytest.raises(C.Error, match=r"rank 3 is outside \[0, 2\)"):
        C.Communicator(C.Communicator.unique_id(), 2, 3, 0, 1.0)
    with pytest.raises(C.Error, match="timeout_s must be > 0"):
        C.Communicator(C.Communicator.unique_id(), 1, 0, 0, 0.0)
    with pytest.raises(C.Error, match=r"ranks \(1, 1\) must list 2 distinct global ranks"):
        C.Communicator(C.Communicator.unique_id(), 2, 0, 0, 1.0, ranks=[1, 1])
    with pytest.raises(C.Error, match=r"ranks \(4,\) must list 2 distinct"):
        C.Communicator(C.Communicator.unique_id(), 2, 0, 0, 1.0, ranks=[4])


def test_groups_are_per_thread_and_balanced():
    # ncclGroupStart/End need no GPU: the thread-local bookkeeping is testable here.
    assert C.group_depth() == 0
    C.group_start()
    C.group_start()
    seen = []
    other = threading.Thread(target=lambda: seen.append(C.group_depth()))
    other.start()
    other.join()
    assert C.group_depth() == 2 and seen == [0]
    C.group_end()
    C.group_end()
    assert C.group_depth() == 0
    with pytest.raises(C.Error, match="group_end without a matching group_start"):
        C.group_end()


def test_empty_comm_set_aborts_nothing():
    s = C.CommSet()
    assert len(s) == 0
    assert s.abort(1.0) == []
    C.group_start()  # inside a group the abort is deferred to the group's end
    assert s.abort(1.0) == []
    C.group_end()


def test_poll_loop_notices_a_short_wait_without_sleeping():
    """The fast policy spins first: a condition true after 5 us is noticed within
    microseconds (the old sleep-first loop took ~77 us). Bounds are loose for shared CI
    machines; bench/bench_poll.py reports the real figures."""
    fast = C._poll_overhead(5.0, 200, "fast")
    assert fast["policy"] == "fast" and fast["iters"] == 200
    assert fast["late_us_p50"] < 10.0, fast
    assert fast["wall_us_mean"] >= 5.0
    legacy = C._poll_overhead(5.0, 20, "legacy")
    assert legacy["probes_mean"] <= 3  # it slept instead of probing
    long = C._poll_overhead(2000.0, 3, "fast")  # spins, yields, then sleeps: still returns
    assert long["wall_us_mean"] >= 2000.0  # (lateness here is preemption-bound on busy CI)
    with pytest.raises(C.Error, match="unknown poll policy 'nope'"):
        C._poll_overhead(1.0, 1, "nope")


def test_poll_benchmark_releases_the_gil():
    progress = []
    worker = threading.Thread(target=lambda: C._poll_overhead(500_000.0, 1, "fast"))
    worker.start()
    while worker.is_alive():
        progress.append(1)  # runs only while the worker does not hold the GIL
        time.sleep(0.001)
    worker.join()
    assert len(progress) > 10  # a held GIL would allow at most one or two


@no_driver
def test_device_count_without_driver():
    with pytest.raises(C.Error, match="no CUDA driver/device"):
        C.device_count()


@no_driver
@pytest.mark.parametrize("make", [
    lambda: C.Stream(),                                                   # owned stream
    lambda: C.Stream(0, -1),                                              # with a priority
    lambda: C.Stream.from_handle(0),                                      # the legacy stream
    lambda: C.Event(),                                                    # event
    lambda: C.Event(0, True),                                             # timing event
    lambda: C.Communicator(C.Communicator.unique_id(), 1, 0, 0, 2.0),     # communicator
], ids=["stream", "stream_priority", "from_handle", "event", "event_timing", "communicator"])
def test_gpu_calls_without_driver_raise_clear_error(make):
    start = time.monotonic()
    with pytest.raises(C.Error, match="no CUDA driver/device") as info:
        make()
    assert ".cpp:" in str(info.value)  # file:line from the CHECK macros
    assert time.monotonic() - start < 2.0


# -- GPU ------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_stream_event_basics():
    s = C.Stream(0, 0)
    assert s.owned and s.device == 0 and s.handle != 0
    wrapped = C.Stream.from_handle(torch.cuda.current_stream().cuda_stream, 0)
    assert not wrapped.owned and wrapped.handle == torch.cuda.current_stream().cuda_stream
    start, end = C.Event(0, True), C.Event(0, True)
    x = torch.randn(2048, 2048, device="cuda")
    start.record(wrapped)
    for _ in range(10):
        x = x @ x.T / 2048
    end.record(wrapped)
    end.synchronize()
    assert end.query()
    assert end.elapsed_ms(start) <= 0.0 <= start.elapsed_ms(end)
    with pytest.raises(C.Error, match="enable_timing"):
        C.Event(0, False).elapsed_ms(end)
    s.synchronize()
    assert s.query()


@pytest.mark.gpu
def test_event_wait_orders_streams():
    side = torch.cuda.Stream()
    main = torch.cuda.current_stream()
    x = torch.zeros(1 << 24, device="cuda")
    side.wait_stream(main)  # the zeros exist before the side stream overwrites them
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy long enough to observe
        x.fill_(1.0)
    done = C.Event(0)
    done.record(side.cuda_stream)
    done.wait(main.cuda_stream)
    y = x * 2  # on main: must see the fill
    torch.cuda.synchronize()
    assert torch.all(y == 2.0)


@pytest.mark.gpu
def test_copy_on_side_stream_overlaps_matmul():
    """A large H2D copy on a side stream overlaps a matmul on the main stream."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.float16)
    host = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dev = torch.empty_like(host, device="cuda")
    side = C.Stream(0, 0)
    main = C.Stream.from_handle(torch.cuda.current_stream().cuda_stream, 0)

    def timed(fn, stream):
        s, e = C.Event(0, True), C.Event(0, True)
        s.record(stream)
        fn()
        e.record(stream)
        return s, e

    def matmuls():
        for _ in range(8):
            a @ a

    def copy():
        with torch.cuda.stream(torch.cuda.ExternalStream(side.handle)):
            dev.copy_(host, non_blocking=True)

    matmuls()  # warm-up
    copy()
    torch.cuda.synchronize()
    ms, me = timed(matmuls, main)
    me.synchronize()
    cs, ce = timed(copy, side)
    ce.synchronize()
    alone = ms.elapsed_ms(me) + cs.elapsed_ms(ce)
    both_start = C.Event(0, True)
    both_start.record(main)
    both_start.wait(side)
    copy()
    matmuls()
    end_copy, end_mm = C.Event(0, True), C.Event(0, True)
    end_copy.record(side)
    end_mm.record(main)
    torch.cuda.synchronize()
    together = max(both_start.elapsed_ms(end_copy), both_start.elapsed_ms(end_mm))
    assert together < 0.9 * alone, (together, alone)


def _one_rank_comm(ranks=None, comm_set=None):
    return C.Communicator(C.Communicator.unique_id(), 1, 0, 0, 30.0, ranks=ranks, comm_set=comm_set)


@pytest.mark.gpu
def test_one_rank_all_reduce_and_collectives():
    comm = _one_rank_comm()
    try:
        assert (comm.rank, comm.nranks, comm.device, comm.alive) == (0, 1, 0, True)
        assert comm.ranks == [0] and comm.global_rank == 0
        stream = C.Stream(0, 0)
        x = torch.arange(1023, dtype=torch.float32, device="cuda")
        out = torch.empty_like(x)
        torch.cuda.synchronize()  # `stream` does not order after torch's current stream
        comm.all_reduce(x.data_ptr(), out.data_ptr(), x.numel(), C.DType.float32, C.RedOp.sum,
                        stream, "ar")
        comm.reduce_scatter(x.data_ptr(), out.data_ptr(), x.numel(), C.DType.float32,
                            C.RedOp.max, stream.handle, "rs")
        comm.broadcast(x.data_ptr(), out.data_ptr(), x.numel(), C.DType.float32, 0, stream, "")
        comm.wait(stream, 10.0, "collectives")
        assert torch.equal(out, x)
        assert comm.async_error() is None
    finally:
        comm.destroy()
    comm.destroy()  # idempotent
    assert not comm.alive
    with pytest.raises(C.Error, match="destroyed"):
        comm.all_reduce(0, 0, 0, C.DType.float32, C.RedOp.sum, 0)


@pytest.mark.gpu
def test_send_to_self_in_one_group():
    comm = _one_rank_comm()
    try:
        stream = C.Stream(0, 0)
        src = torch.arange(1023, dtype=torch.bfloat16, device="cuda")
        dst = torch.zeros_like(src)
        torch.cuda.synchronize()
        C.group_start()
        comm.send(src.data_ptr(), src.numel(), C.DType.bfloat16, 0, stream, "self_send")
        comm.recv(dst.data_ptr(), dst.numel(), C.DType.bfloat16, 0, stream, "self_recv")
        C.group_end()
        done = C.Event(0)
        done.record(stream)
        comm.wait(done, 10.0, "send-to-self", "", 0)
        assert torch.equal(src, dst)
    finally:
        comm.destroy()


@pytest.mark.gpu
def test_one_group_over_two_communicators_polls_both():
    """Ops on two communicators inside one thread-wide group: group_end enqueues and polls
    both; both results are there after waiting on each communicator's stream."""
    cset = C.CommSet()
    a, b = _one_rank_comm(comm_set=cset), _one_rank_comm(comm_set=cset)
    try:
        assert len(cset) == 2
        sa, sb = C.Stream(0, 0), C.Stream(0, 0)
        x = torch.arange(1023, dtype=torch.float32, device="cuda")
        ya, yb = torch.empty_like(x), torch.empty_like(x)
        torch.cuda.synchronize()
        C.group_start()
        a.all_reduce(x.data_ptr(), ya.data_ptr(), x.numel(), C.DType.float32, C.RedOp.sum, sa, "a")
        b.all_reduce(x.data_ptr(), yb.data_ptr(), x.numel(), C.DType.float32, C.RedOp.sum, sb, "b")
        assert C.group_depth() == 1
        C.group_end()
        assert C.group_depth() == 0
        a.wait(sa, 10.0, "all_reduce", "a")
        b.wait(sb, 10.0, "all_reduce", "b")
        assert torch.equal(ya, x) and torch.equal(yb, x)
    finally:
        a.destroy()
        b.destroy()


@pytest.mark.gpu
def test_wait_timeout_names_global_ranks_and_aborts_the_whole_set():
    """A stalled wait on one communicator aborts every member of its set, and the error says
    global ranks (here rank 5 of group (5,)), NCCL's own text and what was aborted. The abort
    may have to wait for the device (NCCL frees device memory), so the bound is relative to
    the measured duration of the sleeping kernel, not a fixed second (a fixed bound after a
    2e9-cycle sleep would fail on an H100, whose abort can wait for the device)."""
    rate = gpu_sleep.cycles_per_s()
    cset = C.CommSet()
    a = _one_rank_comm(ranks=[5], comm_set=cset)
    b = _one_rank_comm(ranks=[5], comm_set=cset)
    stream = torch.cuda.Stream()
    sleep_s = 1.5
    gpu_sleep.sleep_on(stream, sleep_s, rate)
    start = time.monotonic()
    with pytest.raises(C.Error) as info:
        a.wait(stream.cuda_stream, 0.2, "recv", "slow op", 0)
    elapsed = time.monotonic() - start
    text = str(info.value)
    assert "NCCL recv 'slow op' (rank 5, peer 5, group (5,), device 0) timed out after 0.2 s" in text
    assert "NCCL reports:" in text
    assert "aborted every NCCL communicator of rank 5 (group (5,), group (5,))" in text
    assert 0.2 <= elapsed < sleep_s + 2.0, (elapsed, sleep_s)
    print(f"wait timeout + abort of 2 communicators: {elapsed:.3f} s (sleep kernel {sleep_s} s)")
    assert not a.alive and not b.alive
    assert a.async_error() == "communicator aborted"
    a.destroy()  # no-op after abort
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_failed_op_aborts_the_set_naming_global_ranks():
    comm = _one_rank_comm(ranks=[3])
    stream = C.Stream(0, 0)
    with pytest.raises(C.Error) as info:  # with NCCL_CHECK_POINTERS=1 (tests/conftest.py), NCCL refuses null buffers
        comm.all_reduce(0, 0, 16, C.DType.float32, C.RedOp.sum, stream, "null")
    text = str(info.value)
    assert "NCCL all_reduce 'null' (rank 3, group (3,), device 0)" in text
    assert "invalid argument" in text and "aborted every NCCL communicator of rank 3" in text
    assert not comm.alive


@pytest.mark.gpu
def test_failure_inside_a_group_aborts_when_the_group_ends():
    """NCCL's open group still refers to the communicator: it is aborted only after
    ncclGroupEnd (aborting it from another thread meanwhile would free it under the group)."""
    comm = _one_rank_comm(ranks=[3])
    stream = C.Stream(0, 0)
    C.group_start()
    try:
        comm.all_reduce(0, 0, 16, C.DType.float32, C.RedOp.sum, stream, "null")
    except C.Error as exc:  # NCCL may report it at the call or only at group end
        assert "is aborted when this thread's NCCL group ends" in str(exc)
    assert comm.alive
    with pytest.raises(C.Error, match="aborted every NCCL communicator of rank 3"):
        C.group_end()
    assert C.group_depth() == 0 and not comm.alive


@pytest.mark.gpu
def test_abort_inside_a_group_happens_at_its_end():
    comm = _one_rank_comm()
    C.group_start()
    comm.abort()
    assert comm.alive  # deferred
    C.group_end()
    assert not comm.alive


@pytest.mark.gpu
def test_wait_releases_the_gil():
    rate = gpu_sleep.cycles_per_s()
    comm = _one_rank_comm()
    try:
        stream = torch.cuda.Stream()
        gpu_sleep.sleep_on(stream, 0.5, rate)
        progress = []
        worker = threading.Thread(target=comm.wait, args=(stream.cuda_stream, 30.0, "sleep"))
        worker.start()
        while worker.is_alive():
            progress.append(comm.alive)  # takes the communicator's lock with the GIL released
            time.sleep(0.001)
        worker.join()
        assert len(progress) > 50 and all(progress)
    finally:
        comm.destroy()


@pytest.mark.gpu
def test_abort_from_another_thread_interrupts_a_wait():
    rate = gpu_sleep.cycles_per_s()
    comm = _one_rank_comm()
    stream = torch.cuda.Stream()
    gpu_sleep.sleep_on(stream, 3.0, rate)
    threading.Timer(0.2, comm.abort).start()
    start = time.monotonic()
    with pytest.raises(C.Error, match=r"NCCL wait 'w' \(rank 0, group \(0,\), device 0\) "
                                      r"interrupted: the communicator was aborted"):
        comm.wait(stream.cuda_stream, 30.0, "wait", "w")
    assert time.monotonic() - start < 3.0 + 2.0
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_cupy_arrays_through_communicator():
    cp = pytest.importorskip("cupy")
    comm = _one_rank_comm()
    try:
        x = cp.arange(1023, dtype=cp.float32)
        y = cp.zeros_like(x)
        stream = cp.cuda.Stream(non_blocking=True)
        cp.cuda.Device().synchronize()  # the arrays were filled on cupy's default stream
        comm.all_reduce(x.__cuda_array_interface__["data"][0], y.__cuda_array_interface__["data"][0],
                        x.size, C.DType.float32, C.RedOp.sum, stream.ptr, "cupy")
        comm.wait(stream.ptr, 10.0, "all_reduce", "cupy")
        assert bool((x == y).all())
    finally:
        comm.destroy()
