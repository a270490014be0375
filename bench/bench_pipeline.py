"""3-GPU prediction from op times measured on this device, against the measured single-device run.

    python bench/bench_pipeline.py [--config F] [--profile h100] [--iters 20] [--json]

No machine here has 3 GPUs, so the 3-GPU figures are the simulator replaying the schedule
tables with (a) each stage's compute time measured here in isolation (one GPU, the runtime's
own stage code, median of --iters after warm-up) and (b) comm times from the device profile's
link model (nothing to measure them on). The single-device baseline is measured, not modelled:
the whole batch through the same stage code on this device. Also reported: host overhead of
the single-device step (wall time / sum of its kernels' device time, from the profiler; GPU only).

For the same spec: the layout as configured, and each micro-batch count in --micro-batches, so
the seed's latency and throughput claims are checked against figures from one run.
On CPU (no GPU) the model is scaled like `pyengine run` and the figures only smoke-test the bench.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from pyengine.core import claims, provenance
from pyengine.core.progress import progress
from pyengine.core.spec import DeploymentSpec, load_spec
from pyengine.execute.scaling import scale_for_cpu
from pyengine.execute.timer import median_time
from pyengine.model.boundaries import boundary_of
from pyengine.model.forward import single_device
from pyengine.model.payloads import Payload, chunk_rows
from pyengine.model.stages import StageKind, stages_of
from pyengine.model.weights import init_weights, make_tokens, take
from pyengine.predict.devices import load_profile
from pyengine.predict.prediction import predict
from pyengine.predict.roofline import op_costs
from pyengine.schedule import Action, Kind, build


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", help="deployment JSON (default: the packaged seed)")
    p.add_argument("--profile", default="h100", help="device profile for the link model (h100|h200|seed32g|FILE)")
    p.add_argument("--micro-batches", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    return p.parse_args(argv)


def _output_inputs(spec: DeploymentSpec, resid: tuple, partials: list[torch.Tensor], tokens: int) -> dict:
    """What the output stage receives under the spec's boundary, from the shards' partials."""
    payload = boundary_of(spec).payload
    if payload is Payload.PARTIAL:
        return {Payload.RESID: [resid], payload: [(p,) for p in partials]}
    total = torch.stack([p.float() for p in partials]).sum(0).to(partials[0].dtype)
    if payload is Payload.HALF:
        rows = chunk_rows(tokens, len(partials))
        padded = torch.zeros(rows * len(partials), total.shape[1], dtype=total.dtype, device=total.device)
        padded[:tokens] = total
        return {Payload.RESID: [resid], payload: [(c,) for c in padded.chunk(len(partials))]}
    return {Payload.RESID: [resid], payload: [(total,)]}


def measure_compute(spec: DeploymentSpec, w: dict, ids: torch.Tensor, iters: int, warmup: int) -> dict:
    """Seconds per COMPUTE action: {(stage, rank, tokens): s}, each timed in isolation."""
    flat = ids.reshape(-1).to(w["embed"].device)
    dev = flat.device
    embed, experts, output = stages_of(spec)
    shards = {r: {n: take(w, n, experts.shard(r)) for n in experts.weight_names} for r in experts.ranks}
    out = {}
    for t in sorted(set(spec.micro_batch_sizes())):
        ids_t = flat[:t]
        first = embed.compute(w, ids_t, {})
        out.update({(StageKind.EMBED, r, t): median_time(lambda: embed.compute(w, ids_t, {}), dev, iters, warmup)
                    for r in embed.ranks})
        act = {Payload.ACT: [first[Payload.ACT]]}
        partials = []
        for r, ws in shards.items():
            partials.append(experts.compute(ws, ids_t, act)[Payload.PARTIAL][0])
            out[(StageKind.EXPERTS, r, t)] = median_time(lambda ws=ws: experts.compute(ws, ids_t, act),
                                                         dev, iters, warmup)
        inputs = _output_inputs(spec, first[Payload.RESID], partials, t)
        out.update({(StageKind.OUTPUT, r, t): median_time(lambda: output.compute(w, ids_t, inputs),
                                                          dev, iters, warmup)
                    for r in output.ranks})
    return out


def cost_fn(spec: DeploymentSpec, measured: dict, profile):
    link = op_costs(spec, profile)
    sizes = spec.micro_batch_sizes()

    def cost(a: Action) -> float:
        if a.kind is not Kind.COMPUTE:
            return link(a)  # no multi-GPU link here: the profile's model
        return measured[(a.stage, a.rank, sizes[a.micro_batch])]

    return cost


def host_overhead(spec: DeploymentSpec, w: dict, ids: torch.Tensor, iters: int, warmup: int) -> dict:
    """Single-device step: wall time vs the sum of its kernels' device time (GPU only)."""
    flat = ids.reshape(-1).to(w["embed"].device)

    def step():
        single_device(spec, w, flat)
        if flat.is_cuda:
            torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    wall = (time.perf_counter() - t0) / iters
    if not flat.is_cuda:
        return {"step_s": wall, "kernels_s": None, "ratio": None}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
    kernels = sum(e.device_time_total for e in prof.key_averages()) / 1e6  # us -> s
    return {"step_s": wall, "kernels_s": kernels, "ratio": wall / kernels if kernels else None}


def _row(spec, w, ids, m, args, profile, single) -> dict:
    """Predicted figures at m micro-batches, fed with this machine's measured op times."""
    s = spec.replace(schedule={"micro_batches": m})
    measured = measure_compute(s, w, ids, args.iters, args.warmup)
    pred, _ = predict(s, profile, build(s), cost=cost_fn(s, measured, profile))
    return {"micro_batches": m, "configured": m == spec.schedule.micro_batches,
            "latency_s": pred.latency_s, "throughput_tokens_per_s": pred.throughput_tokens_per_s,
            "bubble_fraction": pred.bubble_fraction, "utilization": pred.utilization,
            "steady_state_utilization": pred.steady_state_utilization,
            "latency_cut_vs_single": 1 - pred.latency_s / single,
            "throughput_gain_vs_single": pred.throughput_tokens_per_s * single
            / spec.model.tokens - 1}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    spec = load_spec(args.config)
    note = ""
    if device.type == "cpu":
        spec, note = scale_for_cpu(spec)
    profile = load_profile(args.profile)
    w = init_weights(spec, args.seed, device=device)
    ids = make_tokens(spec, args.seed)
    flat = ids.reshape(-1).to(device)
    single = median_time(lambda: single_device(spec, w, flat), device, args.iters, args.warmup)
    rows = []
    counts = [m for m in dict.fromkeys([spec.schedule.micro_batches, *args.micro_batches])
              if m <= spec.model.tokens]
    with progress(len(counts), "bench_pipeline", enabled=not args.json) as advance:
        for m in counts:
            rows.append(_row(spec, w, ids, m, args, profile, single))
            advance()
    out = {"env": provenance.record(device), "profile": profile.name, "scaled": note,
           "single_device_s": single, "host_overhead": host_overhead(spec, w, ids, args.iters, args.warmup),
           "claims": {c.key: c.target for c in claims.HEADLINE}, "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    else:
        _print(out)
    return 0


def _print(out: dict) -> None:
    from pyengine.report.tables import print_table

    for k, v in out["env"].items():
        print(f"# {k}: {v}")
    if out["scaled"]:
        print(f"# {out['scaled']}")
    h = out["host_overhead"]
    ratio = "n/a (CPU)" if h["ratio"] is None else f"{h['ratio']:.2f}"
    print(f"# single device (measured): {out['single_device_s'] * 1e3:.3f} ms per batch; "
          f"host overhead step/kernels: {ratio}")
    print(f"# 3-GPU rows: simulator with measured compute times, link model '{out['profile']}'")
    rows = [[str(r["micro_batches"]) + (" (config)" if r["configured"] else ""),
             f"{r['latency_s'] * 1e3:.3f}", f"{r['throughput_tokens_per_s']:,.0f}",
             f"{r['bubble_fraction']:.1%}", f"{r['utilization']:.1%}", f"{r['steady_state_utilization']:.1%}",
             f"{r['latency_cut_vs_single']:+.1%}", f"{r['throughput_gain_vs_single']:+.1%}"]
            for r in out["rows"]]
    print_table("predicted 3-GPU pipeline vs measured single device",
                ["m", "latency ms", "tokens/s", "bubble", "util (batch)", "util (steady)",
                 f"latency cut (seed: {claims.LATENCY_CUT.target:.0%})",
                 f"throughput gain (seed: +{claims.THROUGHPUT_GAIN.target:.0%})"], rows)


if __name__ == "__main__":
    sys.exit(main())
