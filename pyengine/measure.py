"""What one rank measures in `pyengine run`: the pipeline and its baselines, same weights, same run.

Variants (all on the same ranks and transport):
  pipeline     the spec as given;
  no_overlap   comm waited on as soon as it is issued (serialised with compute);
  m1           one micro-batch (no pipelining);
  single       the whole block on one device, sequential, same stage code (output rank only).
Latency: each timed iteration starts after a barrier and ends when the rank's last op has
completed. Throughput: STREAM_BATCHES batches streamed as one schedule (see stream_spec).
"""

from __future__ import annotations

import time
from dataclasses import asdict

import torch

from pyengine import model, provenance, stages
from pyengine.runtime import RankRuntime
from pyengine.spec import DeploymentSpec


STREAM_BATCHES = 4


def variants(spec: DeploymentSpec, baselines: bool) -> dict[str, DeploymentSpec]:
    out = {"pipeline": spec}
    if baselines:
        if spec.comm.overlap:
            out["no_overlap"] = spec.replace(comm={"overlap": False})
        if spec.schedule.micro_batches != 1:
            out["m1"] = spec.replace(schedule={"micro_batches": 1})
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_rank(spec: DeploymentSpec, rank: int, transport, device: torch.device, opts,
                 barrier) -> dict:
    weights = stages.rank_weights(spec, opts.seed, rank, device)
    ids = model.make_tokens(spec, opts.seed)
    out: dict = {"rank": rank, "device": provenance.device_name(device), "variants": {}}
    for name, vspec in variants(spec, opts.baselines).items():
        rt = RankRuntime(vspec, rank, transport, weights, device,
                         fault=opts.fault if name == "pipeline" else "")
        for _ in range(opts.warmup):
            rt.forward(ids, timed=False)
        latencies, last = [], None
        if opts.profile and device.type == "cuda":
            torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi
        for _ in range(opts.iters):
            barrier()
            t0 = time.perf_counter()
            last = rt.forward(ids)
            latencies.append(time.perf_counter() - t0)
        stream_tokens, stream_s = _stream(vspec, rank, transport, weights, device, opts, barrier)
        if opts.profile and device.type == "cuda":
            torch.cuda.profiler.stop()
        out["variants"][name] = {
            "latency_s": latencies, "stream_tokens": stream_tokens, "stream_s": stream_s,
            "iters": opts.iters, "times": [asdict(t) for t in last.times], "t0": last.t0}
        if name == "pipeline" and last.logits is not None:
            out["logits"] = last.logits.float().cpu().numpy()  # numpy: pickles by value across processes
        barrier()
    if rank == spec.stage("output").gpus[0]:
        out.update(_single_device(spec, opts, ids, device))
    return out


def stream_spec(spec: DeploymentSpec, batches: int) -> DeploymentSpec:
    """`batches` batches back to back as one schedule of batches*m micro-batches, so batch i+1's
    first stages overlap batch i's last ones: the steady state of a continuous stream."""
    return spec.replace(model={"batch_size": spec.model.batch_size * batches},
                        schedule={"micro_batches": spec.schedule.micro_batches * batches})


def _stream(spec: DeploymentSpec, rank: int, transport, weights: dict, device: torch.device, opts,
            barrier) -> tuple[int, float]:
    """(tokens, seconds) of a stream of STREAM_BATCHES batches after one untimed pass."""
    sspec = stream_spec(spec, STREAM_BATCHES)
    rt = RankRuntime(sspec, rank, transport, weights, device)
    ids = model.make_tokens(sspec, opts.seed)
    rt.forward(ids, timed=False)
    barrier()
    t0 = time.perf_counter()
    rt.forward(ids, timed=False)
    return sspec.model.tokens, time.perf_counter() - t0


def _single_device(spec: DeploymentSpec, opts, ids: torch.Tensor, device: torch.device) -> dict:
    """Reference logits (loop over experts) and the single-device sequential baseline."""
    w = model.init_weights(spec, opts.seed, device=device)
    flat = ids.reshape(-1).to(device)
    reference = model.reference_forward(spec, w, ids.to(device)).float().cpu().numpy()

    def sequential() -> torch.Tensor:
        return stages.single_device(spec, w, flat)

    for _ in range(opts.warmup):
        sequential()
    _sync(device)
    lat = []
    for _ in range(opts.iters):
        t0 = time.perf_counter()
        sequential()
        _sync(device)
        lat.append(time.perf_counter() - t0)
    return {"reference_logits": reference, "single_latency_s": lat}
