"""A stop signal whose raise was lost (it landed in a finalizer or a C callback, where Python only
reports exceptions) still stops the job: the thread launcher's watch loop raises it again, and
every virtual rank stops at its next action. Without it, `pyengine run --backend local` with a
SIGHUP in its first half second ran on forever, the handler having already ignored later signals."""

import signal
import threading
import time

import pytest

from pyengine.core import stop_signal
from pyengine.execute.threads import run_threads


def test_a_recorded_signal_is_raised_by_the_watch_loop_and_the_ranks_stop():
    ran = threading.Event()

    def context(rank, world, transport, device, barrier, on_action):
        return on_action

    def body(on_action):  # a rank that runs actions until told to stop
        while True:
            on_action("l0.s0.mb0.COMPUTE", True)
            ran.set()
            time.sleep(0.01)
            on_action("l0.s0.mb0.COMPUTE", False)

    threading.Timer(0.5, stop_signal.record, args=(signal.SIGHUP,)).start()  # the raise itself lost
    start = time.monotonic()
    try:
        with pytest.raises(stop_signal.Terminated) as e:
            run_threads(body, 3, timeout_s=30, idle_s=60, context=context)
    finally:
        stop_signal.record(None)
    assert ran.is_set() and e.value.code == 128 + signal.SIGHUP
    assert time.monotonic() - start < 10
    time.sleep(0.3)
    assert not [t for t in threading.enumerate() if t.name.startswith("pyengine-vrank")]
