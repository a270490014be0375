"""The one timer of the engine: CUDA events on a stream when the device is a GPU, perf_counter
on the CPU. The runtime marks actions with it; the benchmarks take medians with it."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


class Timer:
    """Marks on `stream` (default: the current one) of `device`; `elapsed(a, b)` in seconds."""

    def __init__(self, device: torch.device, stream: Any = None):
        self.cuda = device.type == "cuda"
        self.device, self.stream = device, stream

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(self.stream if self.stream is not None else torch.cuda.current_stream(self.device))
        return ev

    def elapsed(self, start: Any, end: Any) -> float:
        """Seconds from `start` to `end` (on GPU: waits for `end` to complete)."""
        if not self.cuda:
            return end - start
        end.synchronize()  # intended sync: a span is read once it has ended
        return start.elapsed_time(end) / 1e3


def median_time(fn: Callable[[], Any], device: torch.device, iters: int, warmup: int = 3) -> float:
    """Median seconds of fn() after `warmup` calls, each timed alone between two marks."""
    timer = Timer(device)
    for _ in range(warmup):
        fn()
    if timer.cuda:
        torch.cuda.synchronize(device)
    times = []
    for _ in range(iters):
        start = timer.mark()
        fn()
        times.append(timer.elapsed(start, timer.mark()))
    return statistics.median(times)
