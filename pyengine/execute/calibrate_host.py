"""What `pyengine calibrate` times of the host: the CPU time to issue one kernel, to issue one captured
CUDA graph, and the runtime's own work per schedule action of a decode step (its Python, events and
transport calls) -- the three host costs the planner prices decode steps with (pyengine.predict.host).

A launch and a replay: `n` issued back to back, the host's wall time over them (a 1-element kernel
runs faster than the host issues it, so the host is what is timed), median of several bursts. The
action: eager decode steps of a small model of layers on this device (3 virtual ranks, the local
transport), rank 0's thread CPU time per step less its launches at the measured launch cost, over
its actions.
"""

from __future__ import annotations

import statistics
from importlib import resources
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class HostMeasurements:
    launch_s: float
    """Host seconds to issue one kernel."""
    replay_s: float
    """Host seconds to issue one captured graph."""
    action_s: float
    """Host seconds of the runtime's own work per schedule action (launches excluded)."""


def _burst_s(issue, n: int, device: torch.device, bursts: int = 7) -> float:
    times = []
    for _ in range(bursts):
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(n):
            issue()
        times.append((time.perf_counter() - t0) / n)
    torch.cuda.synchronize(device)
    return statistics.median(times)


def measure_host(device: torch.device, n: int = 500) -> HostMeasurements:
    x = torch.zeros(1, device=device)
    launch = _burst_s(lambda: x.add_(1.0), n, device)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        x.add_(1.0)  # warm outside the capture
        g = torch.cuda.CUDAGraph()
        g.capture_begin()
        x.add_(1.0)
        g.capture_end()
    replay = _burst_s(g.replay, n, device)
    return HostMeasurements(launch, replay, measure_action(device, launch))


def measure_action(device: torch.device, launch_s: float, steps: int = 10) -> float:
    """Rank 0's host seconds per action of an eager decode step, launches excluded."""
    from pyengine.core.spec import load_spec
    from pyengine.execute.graphs import GraphMode
    from pyengine.execute.launches import LaunchCounter
    from pyengine.execute.step_loop import StepLoop
    from pyengine.execute.step_plan import SeqWork, StepPlan
    from concurrent.futures import ThreadPoolExecutor
    from pyengine.model.weights import DeviceRandomWeights, rank_weights
    from pyengine.transport.local import LocalTransport

    spec = load_spec(str(resources.files("pyengine").joinpath("configs", "seed_model_3gpu.json"))).replace(model={
        "num_layers": 4, "hidden_size": 256, "ffn_hidden_size": 512, "vocab_size": 1000, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64}, schedule={"micro_batches": 2})
    transports = LocalTransport.create(3, device.type, 60)

    def rank(r):
        w = rank_weights(spec, DeviceRandomWeights(0), r, device)
        loop = StepLoop(spec, r, transports[r], w, device, slots=8, capacity=64, graphs=GraphMode.OFF)
        loop.run(StepPlan(tuple(SeqWork(s, (5, 6, 7), 0) for s in range(8))), timed=False)
        samples = []
        for i in range(steps + 2):
            counter = LaunchCounter() if i == steps + 1 else None
            loop.launches = counter
            c0 = time.thread_time()
            loop.run(StepPlan(tuple(SeqWork(s, (9,), 3 + i) for s in range(8))), timed=False)
            if counter is not None:
                rt = next(iter(loop._decode.values()))[0]
                return statistics.median(samples), counter.total(), len(rt.actions)
            if i >= 1:
                samples.append(time.thread_time() - c0)
        return None

    with ThreadPoolExecutor(3) as pool:
        host, launches, actions = list(pool.map(rank, range(3)))[0]
    return max(0.0, (host - launches * launch_s) / actions)
