"""3-GPU prediction from op times measured on this device, against the measured single-device run.

    python bench/bench_pipeline.py [--config F] [--profile h100] [--iters 20] [--json]

No machine here has 3 GPUs, so the 3-GPU figures are the simulator replaying the schedule
tables with (a) each stage's compute time measured here in isolation (one GPU, same kernels
as the runtime, median of --iters after warm-up) and (b) comm times from the device profile's
link model (nothing to measure them on). The single-device baseline is measured, not modelled:
the whole batch through the same stage code on this device. Also reported: host overhead of
the single-device step (wall time / sum of its kernels' device time, from the profiler; GPU only).

For the same spec: the seed's layout as configured, and each micro-batch count in --micro-batches,
so the seed's 40% / +60% / 95% claims are checked against figures from one run.
On CPU (no GPU) the model is scaled like `pyengine run` and the figures only smoke-test the bench.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from pyengine import model, provenance, stages
from pyengine.devices import load_profile
from pyengine.planner import predict
from pyengine.run_cli import scale_for_cpu
from pyengine.schedule import Action, Kind, build
from pyengine.simulate import default_op_costs
from pyengine.spec import DeploymentSpec, load_spec


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


class Timer:
    """Median wall/device time of fn() after warm-up: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: torch.device, iters: int, warmup: int):
        self.device, self.iters, self.warmup = device, iters, warmup

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.iters):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


def shard(w: dict, start: int, end: int) -> dict:
    return {"w_gate": w["w_gate"][:, :, start:end].contiguous(),
            "w_up": w["w_up"][:, :, start:end].contiguous(),
            "w_down": w["w_down"][:, start:end, :].contiguous()}


def measure_compute(spec: DeploymentSpec, w: dict, ids: torch.Tensor, timer: Timer) -> dict:
    """Seconds per COMPUTE action kind: {(stage, rank, tokens): s}, each timed in isolation."""
    flat = ids.reshape(-1).to(w["embed"].device)
    shards = {r: shard(w, a, b) for r, a, b in spec.ffn_shards()}
    n_parts = len(shards) if spec.comm.boundary == "partials" else 1
    out = {}
    for t in sorted(set(spec.micro_batch_sizes())):
        x, u, top_ids, top_w = stages.stage0(spec, w, flat[:t])
        out[(0, t)] = timer(lambda: stages.stage0(spec, w, flat[:t]))
        partials = []
        for r, ws in shards.items():
            partials.append(stages.stage1(ws, u, top_ids, top_w))
            out[(1, r, t)] = timer(lambda ws=ws: stages.stage1(ws, u, top_ids, top_w))
        pieces = partials if n_parts > 1 else [torch.stack(partials).sum(0)]
        out[(2, t)] = timer(lambda: stages.stage2(spec, w, x, pieces))
    return out


def cost_fn(spec: DeploymentSpec, measured: dict, profile):
    link = default_op_costs(spec, profile)
    sizes = spec.micro_batch_sizes()

    def cost(a: Action) -> float:
        if a.kind is not Kind.COMPUTE:
            return link(a)  # no multi-GPU link here: the profile's model
        t = sizes[a.micro_batch]
        return measured[(1, a.rank, t)] if a.stage == 1 else measured[(a.stage, t)]

    return cost


def host_overhead(spec: DeploymentSpec, w: dict, ids: torch.Tensor, timer: Timer) -> dict:
    """Single-device step: wall time vs the sum of its kernels' device time (GPU only)."""
    flat = ids.reshape(-1).to(w["embed"].device)

    def step():
        return stages.single_device(spec, w, flat)

    wall = timer(lambda: (step(), torch.cuda.synchronize() if flat.is_cuda else None))
    if not flat.is_cuda:
        return {"step_s": wall, "kernels_s": None, "ratio": None}
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels = sum(e.device_time_total for e in prof.key_averages()) / 1e6  # us -> s
    return {"step_s": wall, "kernels_s": kernels, "ratio": wall / kernels if kernels else None}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    spec = load_spec(args.config)
    note = ""
    if device.type == "cpu":
        spec, note = scale_for_cpu(spec)
    profile = load_profile(args.profile)
    timer = Timer(device, args.iters, args.warmup)
    w = model.init_weights(spec, args.seed, device=device)
    ids = model.make_tokens(spec, args.seed)
    flat = ids.reshape(-1).to(device)
    single = {"full": timer(lambda: stages.single_device(spec, w, flat))}
    rows = []
    for m in dict.fromkeys([spec.schedule.micro_batches, *args.micro_batches]):
        if m > spec.model.tokens:
            continue
        s = spec.replace(schedule={"micro_batches": m})
        measured = measure_compute(s, w, ids, timer)
        pred, _ = predict(s, profile, build(s), cost=cost_fn(s, measured, profile))
        rows.append({"micro_batches": m, "configured": m == spec.schedule.micro_batches,
                     "latency_s": pred.latency_s, "throughput_tokens_per_s": pred.throughput_tokens_per_s,
                     "bubble_fraction": pred.bubble_fraction, "utilization": pred.utilization,
                     "steady_state_utilization": pred.steady_state_utilization,
                     "latency_cut_vs_single": 1 - pred.latency_s / single["full"],
                     "throughput_gain_vs_single": pred.throughput_tokens_per_s * single["full"]
                     / spec.model.tokens - 1})
    out = {"env": provenance.record(device), "profile": profile.name, "scaled": note,
           "single_device_s": single["full"], "host_overhead": host_overhead(spec, w, ids, timer),
           "rows": rows}
    if args.json:
        print(json.dumps(out, indent=1, default=float))
    else:
        _print(out)
    return 0


def _print(out: dict) -> None:
    from pyengine.report import print_table

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
                 "latency cut (seed: 40%)", "throughput gain (seed: +60%)"], rows)


if __name__ == "__main__":
    sys.exit(main())
