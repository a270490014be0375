"""Decode steps of a whole model on one device (the local transport: 3 virtual ranks), eager and graphed.

    python bench/bench_decode.py [--config F] [--sequences 1 8 32 128 256] [--groups 1 2]
                                 [--modes eager graphed] [--prompt 128] [--steps 20] [--count] [--json]

Per (sequences, groups, mode): ms per step (the slowest rank's wall time, median over --steps after a
warm-up that captures the graphs), tokens/s, per rank host microseconds per step (its thread's CPU
time: Python and launches) beside device microseconds per step (its compute actions' CUDA-event
spans), the bytes a step must read (every weight it touches once: attention, router, the experts
the step's tokens chose, the head; plus the KV cache it attends over) and, on a GPU, that over the
step time against the device-to-device copy rate measured in the same run. `--count` adds launches
per step per rank (aten ops that launch a kernel + Triton launches). Rows are JSON lines after a
provenance line. On CPU the rows check the engine (the same code, the torch path or, with
PYENGINE_KERNELS=triton, the Triton kernels in the interpreter), not GPU speed; the model is
scaled like `pyengine run`, and `growth` is each row's step time over the 8-sequence row's.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from pyengine.core import dtypes, provenance
from pyengine.core.spec import DeploymentSpec, load_spec
from pyengine.execute.graphs import GraphMode
from pyengine.execute.launches import LaunchCounter
from pyengine.execute.step_loop import StepLoop
from pyengine.execute.step_plan import SeqWork, StepPlan
from pyengine.model.weights import DeviceRandomWeights, rank_weights
from pyengine.transport.local import LocalTransport

MODEL = "pyengine/configs/seed_model_3gpu.json"
WARMUP_STEPS = 3  # eager, capture, first replay
CPU_NOTE = "CPU: checks the engine (same code path), not GPU speed"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=MODEL, help=f"deployment JSON of a model of layers (default: {MODEL})")
    p.add_argument("--sequences", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2], help="decode micro-batches (groups)")
    p.add_argument("--modes", nargs="+", choices=["eager", "graphed"], default=["eager", "graphed"])
    p.add_argument("--prompt", type=int, default=128, help="tokens per prompt (the KV each step reads)")
    p.add_argument("--steps", type=int, default=20, help="timed decode steps per row")
    p.add_argument("--count", action="store_true", help="also count launches per step per rank")
    p.add_argument("--no-scale", action="store_true", help="on CPU, the model at full size")
    p.add_argument("--weights", choices=["seeded", "device-random"],
                   help="seeded (the engine's seeded values, made on the CPU) or drawn on the device "
                        "(timing only); default: device-random on a GPU, seeded on CPU")
    p.add_argument("--json", action="store_true", help="JSON lines only")
    return p.parse_args(argv)


def device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def copy_gb_s(dev: torch.device, nbytes: int = 1 << 30) -> float | None:
    """Device-to-device copy rate (bytes read + written per second), median of 20 after warm-up."""
    if dev.type != "cuda":
        return None
    src = torch.empty(nbytes // 2, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    times = []
    for i in range(25):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        dst.copy_(src)
        b.record()
        b.synchronize()
        if i >= 5:
            times.append(a.elapsed_time(b) / 1e3)
    return nbytes / statistics.median(times) / 1e9


# ---- what a step must read ----------------------------------------------------------------------
def must_read(spec: DeploymentSpec, keys: int, touched: dict[int, set[int]]) -> int:
    """Bytes of one decode step read once: every layer's attention and router weights, the experts
    its tokens chose (`touched`: layer -> expert ids, over every group), the head, and `keys` cached
    key/value rows per layer (the sum over sequences of their lengths)."""
    m, es = spec.model, dtypes.nbytes(spec.model.dtype)
    h, d = m.hidden_size, m.head_size
    q, kv = m.heads * d, m.kv_heads * d
    attention = (h * (q + 2 * kv) + q * h + 2 * h + h * m.num_experts) * es
    expert = 3 * h * m.ffn_hidden_size * es
    experts = sum(len(touched.get(layer, ())) for layer in range(m.layers)) * expert
    cache = keys * 2 * kv * es * m.layers
    return m.layers * attention + experts + cache + (h * m.vocab_size + h) * es


def touched_experts(routes: dict) -> dict[int, set[int]]:
    out: dict[int, set[int]] = {}
    for (layer, _), ids in routes.items():
        out.setdefault(layer, set()).update(e for e in torch.unique(ids).tolist() if e >= 0)
    return out


# ---- one row ------------------------------------------------------------------------------------
def run_case(spec: DeploymentSpec, n: int, groups: int, mode: str, args, dev: torch.device,
             weights: list[dict]) -> dict:
    spec = spec.replace(schedule={"micro_batches": groups})
    transports = LocalTransport.create(spec.world_size, dev.type, spec.comm.timeout_s)
    g = torch.Generator().manual_seed(n * 31 + groups)
    prompts = torch.randint(0, spec.model.vocab_size, (n, args.prompt), generator=g).tolist()
    capacity = args.prompt + WARMUP_STEPS + args.steps + 2

    def rank(r: int) -> dict:
        loop = StepLoop(spec, r, transports[r], weights[r], dev, slots=n, capacity=capacity,
                        graphs=GraphMode.AUTO if mode == "graphed" else GraphMode.OFF)
        seqs = [list(p) for p in prompts]
        out = loop.run(StepPlan(tuple(SeqWork(s, tuple(p), 0) for s, p in enumerate(prompts))), timed=False)
        _extend(seqs, out.ids)
        rec = {"wall": [], "host": [], "device": [], "keys": [], "routes": {}, "launches": None,
               "graphs": loop.graphs_reason}
        for i in range(WARMUP_STEPS + args.steps + (1 if args.count else 0)):
            plan = StepPlan(tuple(SeqWork(s, (seq[-1],), len(seq) - 1) for s, seq in enumerate(seqs)))
            counting = args.count and i == WARMUP_STEPS + args.steps
            loop.launches = LaunchCounter() if counting else None
            t0, c0 = time.perf_counter(), time.thread_time()
            out = loop.run(plan, timed=not counting)
            host, wall = time.thread_time() - c0, time.perf_counter() - t0
            _extend(seqs, out.ids)
            if counting:
                rec["launches"] = loop.launches.total()
            elif i >= WARMUP_STEPS:
                rec["wall"].append(wall)
                rec["host"].append(host)
                rec["device"].append(sum(t.end_s - t.start_s for t in out.times if t.lane == "compute"))
                rec["keys"].append(sum(len(s) - 1 for s in seqs))
                rec["routes"] = out.routes or rec["routes"]
        return rec

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(spec.world_size) as pool:
        recs = list(pool.map(rank, range(spec.world_size)))
    return row(spec, n, groups, mode, recs)


def _extend(seqs: list[list[int]], ids: list[int]) -> None:
    for s, i in zip(seqs, ids):
        s.append(i)


def row(spec: DeploymentSpec, n: int, groups: int, mode: str, recs: list[dict]) -> dict:
    """One JSON row from the ranks' records (rank order)."""
    steps = len(recs[0]["wall"])
    step_s = statistics.median(max(r["wall"][i] for r in recs) for i in range(steps))
    router = next((r for r in recs if r["routes"]), recs[0])
    nbytes = must_read(spec, int(statistics.median(recs[0]["keys"])), touched_experts(router["routes"]))
    out = {"sequences": n, "groups": groups, "mode": mode, "graphs": recs[0]["graphs"],
           "ms_per_step": step_s * 1e3, "tokens_per_s": n / step_s,
           "host_us": {str(r): statistics.median(x["host"]) * 1e6 for r, x in enumerate(recs)},
           "device_us": {str(r): statistics.median(x["device"]) * 1e6 for r, x in enumerate(recs)},
           "must_read_bytes": nbytes, "read_gb_s": nbytes / step_s / 1e9}
    if recs[0]["launches"] is not None:
        out["launches"] = {str(r): x["launches"] for r, x in enumerate(recs)}
    return out


def add_rates(rows: list[dict], copy_rate: float | None, on_gpu: bool) -> None:
    """pct_copy (GPU) and growth: step time over the same mode and groups' 8-sequence row."""
    base = {(r["mode"], r["groups"]): r["ms_per_step"] for r in rows if r["sequences"] == 8}
    for r in rows:
        if copy_rate:
            r["pct_copy"] = 100 * r["read_gb_s"] / copy_rate
        if (r["mode"], r["groups"]) in base:
            r["growth_vs_8"] = r["ms_per_step"] / base[(r["mode"], r["groups"])]
        if not on_gpu:
            r["note"] = CPU_NOTE


def main(argv=None) -> int:
    args = parse_args(argv)
    dev = device()
    args.weights = args.weights or ("device-random" if dev.type == "cuda" else "seeded")
    spec = load_spec(args.config)
    if not spec.model.layered:
        print(f"bench_decode: --config {args.config}: a model of layers (model.num_layers) is needed",
              file=sys.stderr)
        return 2
    note = ""
    if dev.type == "cpu" and not args.no_scale:
        from pyengine.execute.scaling import scale_for_cpu

        spec, note = scale_for_cpu(spec)
    copy_rate = copy_gb_s(dev)
    env = {**provenance.record(dev), "copy_gb_s": copy_rate, "scaled": note, "config": args.config,
           "weights": args.weights}
    print(json.dumps({"env": env}), flush=True)
    source = DeviceRandomWeights() if args.weights == "device-random" else 0
    weights = [rank_weights(spec, source, r, dev) for r in range(spec.world_size)]  # once: every row's
    rows = []
    for mode in args.modes:
        for groups in args.groups:
            for n in args.sequences:
                if groups > n:
                    continue
                rows.append(run_case(spec, n, groups, mode, args, dev, weights))
                gc.collect()  # the row's caches, static buffers and graphs go before the next
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    add_rates(rows, copy_rate, dev.type == "cuda")
    for r in rows:
        print(json.dumps(r), flush=True)
    if not args.json:
        print_table(rows)
    return 0


def print_table(rows: list[dict]) -> None:
    print("# mode     groups  seqs  ms/step  tokens/s  host us (ranks)       device us (ranks)     "
          "%copy  growth", file=sys.stderr)
    for r in rows:
        host = "/".join(f"{v:.0f}" for v in r["host_us"].values())
        dev = "/".join(f"{v:.0f}" for v in r["device_us"].values())
        print(f"  {r['mode']:8} {r['groups']:6} {r['sequences']:5} {r['ms_per_step']:8.3f} "
              f"{r['tokens_per_s']:9.0f}  {host:21} {dev:21} {r.get('pct_copy') or float('nan'):5.1f}  "
              f"{r.get('growth_vs_8') or float('nan'):.2f}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
