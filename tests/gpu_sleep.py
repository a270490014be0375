"""A GPU kernel of known duration for timing tests: torch.cuda._sleep spins for a number of
GPU clock cycles, so its length depends on the device's SM clock (about 1 s per 2e9 cycles on
an H100). Tests measure the rate here instead of assuming one: a bound written for one GPU's
clock fails on another's."""

import torch


def cycles_per_s() -> float:
    torch.cuda._sleep(1000)  # warm-up: module load
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(100_000_000)
    end.record()
    end.synchronize()
    return 100_000_000 / (start.elapsed_time(end) / 1e3)


def sleep_on(stream: torch.cuda.Stream | None, seconds: float, rate: float) -> None:
    """Queue a kernel that keeps `stream` (default: the current one) busy for ~`seconds`."""
    with torch.cuda.stream(stream or torch.cuda.current_stream()):
        torch.cuda._sleep(int(seconds * rate))
