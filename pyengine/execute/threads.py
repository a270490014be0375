"""The local backend's runner: every virtual rank is a thread of this process, on one device.

Threads cannot be killed or stopped one by one, so a virtual rank "dies" by raising and
"stalls" by never reaching its next action. Each thread keeps its record on a liveness board
(pyengine.execute.liveness); when one fails, pyengine.execute.blame names the rank that raised a
real error or the one stalled in an action, never a peer that timed out waiting on it. On
Ctrl-C (or SIGTERM turned into an exception) every virtual rank is told to stop at its next
action and the exception goes on to the caller.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import torch

from pyengine.core.stop_signal import raise_if_stopped
from pyengine.execute.blame import explain, idle_for
from pyengine.execute.liveness import Beacon, Board
from pyengine.execute.procs import SETTLE_S

STOP_GRACE_S = 2.0
"""After a failure or Ctrl-C, how long the other virtual ranks get to leave on their own."""


class ThreadFailure(RuntimeError):
    """A virtual rank failed; the message names the rank that caused it."""


def run_threads(body: Callable, world: int, timeout_s: float, idle_s: float,
                context: Callable[..., Any]) -> list:
    """`body(context(rank, world, transport, device, barrier, on_action))` on `world` threads."""
    from pyengine.transport.local import LocalTransport

    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    transports = LocalTransport.create(world, device, timeout_s)
    board, stop = Board.for_threads(world), threading.Event()
    barrier = threading.Barrier(world, timeout=timeout_s)
    results: list = [None] * world
    errors: dict[int, BaseException] = {}  # insertion order: the order the ranks failed in

    def run(r: int) -> None:
        beacon = Beacon(board, r, heartbeat=False, stop=stop)

        def wait_all() -> None:
            with beacon.waiting("barrier"):
                barrier.wait()

        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            with beacon:
                results[r] = body(context(r, world, transports[r], device, wait_all, beacon.on_action))
        except BaseException as e:  # reported below with the rank that caused it named
            errors[r] = e
            barrier.abort()  # release peers blocked in a barrier

    threads = [threading.Thread(target=run, args=(r,), name=f"pyengine-vrank{r}", daemon=True)
               for r in range(world)]
    try:
        for t in threads:
            t.start()
        failure = _watch(threads, errors, board, idle_s, timeout_s)
    finally:  # a failure, Ctrl-C or SIGTERM: every virtual rank stops at its next action
        if any(t.is_alive() for t in threads):
            stop.set()
            barrier.abort()
            _join(threads, STOP_GRACE_S)
        for t in transports:
            t.close()
    if failure is not None:
        raise ThreadFailure(failure)
    return results


def _watch(threads: list[threading.Thread], errors: dict[int, BaseException], board: Board,
           idle_s: float, stall_s: float) -> str | None:
    """Until every thread is done: the headline of the first failure, or None."""
    while any(t.is_alive() for t in threads):
        if errors:
            first, exc = next(iter(errors.items()))
            return _settle(board, first, f"{type(exc).__name__}: {exc}", stall_s)
        idle = idle_for(board.records())
        if idle > idle_s:
            return _settle(board, None, f"no rank made progress for {idle:.0f} s", stall_s)
        for t in threads:
            t.join(0.05)
        raise_if_stopped()
    if errors:
        first, exc = next(iter(errors.items()))
        return _settle(board, first, f"{type(exc).__name__}: {exc}", stall_s)
    return None


def _settle(board: Board, noticed_by: int | None, noticed: str, stall_s: float) -> str:
    """The true cause, given up to SETTLE_S to show (a stalled rank may have entered its action
    a little after its peer began to wait on it)."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        final = time.monotonic() >= deadline
        found = explain(board, noticed_by, noticed, dead={}, stall_s=stall_s, final=final)
        if found is not None:
            return found[1]
        time.sleep(0.05)


def _join(threads: list[threading.Thread], grace_s: float) -> None:
    deadline = time.monotonic() + grace_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
