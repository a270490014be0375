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
from dataclasses import dataclass
from typing import Any

import torch

from pyengine.core import provenance
from pyengine.core.progress import progress
from pyengine.core.spec import DeploymentSpec
from pyengine.execute.faults import Fault
from pyengine.execute.launch import RankContext
from pyengine.execute.results import RankMeasurement, VariantMeasurement
from pyengine.execute.runtime import RankRuntime
from pyengine.model.forward import single_device
from pyengine.model.measured_routing import pairs_per_expert
from pyengine.model.reference import reference_forward
from pyengine.model.weights import (SeededWeights, full_read_bytes, full_weights, make_tokens,
                                    rank_read_bytes, rank_weights)

STREAM_BATCHES = 4


@dataclass(frozen=True, slots=True)
class RunOptions:
    iters: int = 10
    warmup: int = 2
    seed: int = 0
    baselines: bool = True
    profile: bool = False
    fault: Fault | None = None
    """Testing hook: kill or stall one rank at one action (pipeline variant only)."""
    source: Any = None
    """A pyengine.model.weights.WeightSource (e.g. a checkpoint); None: seeded by `seed`."""
    tokens: Any = None
    """Token ids [B, S] (int64 tensor); None: seeded by `seed`."""
    show_progress: bool = False
    """Rank 0 draws a bar over the forwards (on a terminal only: pyengine.core.progress)."""

    def weights(self):
        return self.source if self.source is not None else SeededWeights(self.seed)

    def ids(self, spec: DeploymentSpec) -> torch.Tensor:
        """This batch's ids; a stream spec of n batches repeats the given ids n times."""
        if self.tokens is None:
            return make_tokens(spec, self.seed)
        return self.tokens.repeat(spec.model.batch_size // self.tokens.shape[0], 1)


def variants(spec: DeploymentSpec, baselines: bool) -> dict[str, DeploymentSpec]:
    out = {"pipeline": spec}
    if baselines:
        if spec.comm.overlap:
            out["no_overlap"] = spec.replace(comm={"overlap": False})
        if spec.schedule.micro_batches != 1:
            out["m1"] = spec.replace(schedule={"micro_batches": 1})
    return out


def stream_spec(spec: DeploymentSpec, batches: int) -> DeploymentSpec:
    """`batches` batches back to back as one schedule of batches*m micro-batches, so batch i+1's
    first stages overlap batch i's last ones: the steady state of a continuous stream."""
    return spec.replace(model={"batch_size": spec.model.batch_size * batches},
                        schedule={"micro_batches": spec.schedule.micro_batches * batches})


def measure_rank(ctx: RankContext, spec: DeploymentSpec, opts: RunOptions) -> RankMeasurement:
    device = ctx.device
    weights = rank_weights(spec, opts.weights(), ctx.rank, device)
    ids = opts.ids(spec)
    out = RankMeasurement(rank=ctx.rank, device=provenance.device_name(device),
                          read_bytes=rank_read_bytes(spec, opts.weights(), ctx.rank))
    runs = variants(spec, opts.baselines)
    draw = opts.show_progress and ctx.rank == 0
    with progress(len(runs) * (opts.warmup + opts.iters), "pyengine run", enabled=draw) as advance:
        _measure_variants(ctx, spec, opts, runs, weights, ids, out, advance)
    if ctx.rank in spec.stage("output").gpus:
        _single_device(out, spec, opts, ids, device, ctx.on_action)
    return out


def _measure_variants(ctx: RankContext, spec: DeploymentSpec, opts: RunOptions, runs: dict, weights,
                      ids: torch.Tensor, out: RankMeasurement, advance) -> None:
    """Warm-up and timed forwards of every variant (`advance`: one step per forward)."""
    device = ctx.device
    for name, vspec in runs.items():
        rt = RankRuntime(vspec, ctx.rank, ctx.transport, weights, device,
                         fault=opts.fault if name == "pipeline" else None, on_action=ctx.on_action)
        for _ in range(opts.warmup):
            rt.forward(ids, timed=False)
            advance()
        latencies, last = [], None
        if opts.profile and device.type == "cuda":
            torch.cuda.profiler.start()  # nsys --capture-range=cudaProfilerApi
        for _ in range(opts.iters):
            ctx.barrier()
            t0 = time.perf_counter()
            last = rt.forward(ids)
            latencies.append(time.perf_counter() - t0)
            advance()
        stream_tokens, stream_s = _stream(ctx, vspec, weights, opts)
        if opts.profile and device.type == "cuda":
            torch.cuda.profiler.stop()
        out.variants[name] = VariantMeasurement(latencies, stream_tokens, stream_s, opts.iters,
                                                last.times, last.t0)
        if name == "pipeline" and last.logits is not None:
            out.logits = last.logits.float().cpu().numpy()  # numpy: pickles by value across processes
        if name == "pipeline" and rt.routes:
            out.expert_counts = expert_counts(spec, rt.routes)
        ctx.barrier()


def expert_counts(spec: DeploymentSpec, routes: dict) -> list[list[int]]:
    """Pairs routed to each expert, per micro-batch, summed over the layers: the router's own
    choices in the pipeline's last timed forward."""
    e = spec.model.num_experts
    out = [[0] * e for _ in range(spec.schedule.micro_batches)]
    for (_, mb), top_ids in routes.items():
        out[mb] = [a + b for a, b in zip(out[mb], pairs_per_expert(top_ids, e))]
    return out


def _stream(ctx: RankContext, spec: DeploymentSpec, weights: dict, opts: RunOptions) -> tuple[int, float]:
    """(tokens, seconds) of a stream of STREAM_BATCHES batches after one untimed pass."""
    sspec = stream_spec(spec, STREAM_BATCHES)
    rt = RankRuntime(sspec, ctx.rank, ctx.transport, weights, ctx.device, on_action=ctx.on_action)
    ids = opts.ids(sspec)
    rt.forward(ids, timed=False)
    ctx.barrier()
    t0 = time.perf_counter()
    rt.forward(ids, timed=False)
    return sspec.model.tokens, time.perf_counter() - t0


def _single_device(out: RankMeasurement, spec: DeploymentSpec, opts: RunOptions, ids: torch.Tensor,
                   device: torch.device, on_action) -> None:
    """The independent reference logits and the single-device sequential baseline, from the full
    weights of the same source (a checkpoint is read whole here, on this rank only: the check's
    cost, not the engine's). Each step is reported to on_action: a long baseline is progress."""
    on_action("single-device reference", False)
    w = full_weights(spec, opts.weights(), device)
    out.check_read_bytes = full_read_bytes(spec, opts.weights())
    flat = ids.reshape(-1).to(device)
    out.reference_logits = reference_forward(spec, w, ids.to(device)).float().cpu().numpy()
    for _ in range(opts.warmup):
        single_device(spec, w, flat)
    _sync(device)
    lat = []
    for i in range(opts.iters):  # wall time, like the pipeline's latency: host overhead included
        on_action(f"single-device iteration {i}", False)
        t0 = time.perf_counter()
        single_device(spec, w, flat)
        _sync(device)
        lat.append(time.perf_counter() - t0)
    out.single_latency_s = lat


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
