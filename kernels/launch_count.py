"""Count Triton launches: every launcher in pyengine.kernels calls count_launch() once per launch.

    with counting() as c:
        shard(u, ...)
    assert c.triton <= 4

The counters live in thread-local storage (ranks run as threads share the process), so one
thread's count never includes another's. Nested `counting()` blocks all count. Outside any
block, count_launch() is one attribute lookup: it stays on the hot path.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass

_local = threading.local()


@dataclass
class LaunchCount:
    triton: int = 0  # Triton kernel launches made by pyengine.kernels in this thread


def count_launch(n: int = 1) -> None:
    """Record n Triton launches in every active counter of this thread."""
    active = getattr(_local, "active", None)
    if active:
        for counter in active:
            counter.triton += n


@contextmanager
def counting():
    """A fresh LaunchCount that sees this thread's launches until the block ends."""
    counter = LaunchCount()
    active = getattr(_local, "active", None)
    if active is None:
        active = _local.active = []
    active.append(counter)
    try:
        yield counter
    finally:  # by identity: two counters with equal counts compare equal
        del active[next(i for i, c in enumerate(active) if c is counter)]
