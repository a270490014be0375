"""Communicator.wait on a stream is safe for concurrent callers: each call records an event of
its own, so one thread's wait cannot re-record another's and return it early (CUDA only)."""

import threading
import time

import gpu_sleep
import pytest
import torch

from pyengine._native import native

C = native()
pytestmark = pytest.mark.gpu


def test_concurrent_waits_each_await_their_own_stream():
    rate = gpu_sleep.cycles_per_s()
    comm = C.Communicator(C.Communicator.unique_id(), 1, 0, 0, 30.0)
    try:
        slow, fast = torch.cuda.Stream(), torch.cuda.Stream()
        gpu_sleep.sleep_on(slow, 1.0, rate)
        slow_done_at_return = []

        def wait_slow():
            comm.wait(slow.cuda_stream, 30.0, "wait", "slow")
            slow_done_at_return.append(slow.query())

        waiter = threading.Thread(target=wait_slow)
        waiter.start()
        time.sleep(0.1)  # the waiter has recorded on `slow` and is polling
        # A shared event would now be re-recorded on the empty `fast` stream and complete at once.
        comm.wait(fast.cuda_stream, 30.0, "wait", "fast")
        waiter.join()
        assert slow_done_at_return == [True], "the slow wait returned before its stream finished"
    finally:
        torch.cuda.synchronize()
        comm.destroy()
