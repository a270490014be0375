"""`pyengine run`: the main job. Validates everything first, then starts the ranks."""

from __future__ import annotations

import argparse
import json
import os
import sys

CPU_FLOP_BUDGET = 4e9  # per batch: keeps the CPU run (3 ranks x 3 variants) well under 60 s
PROFILE_ITERS = 5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the 3-stage pipeline end to end and report measurements",
                       description="Runs the deployment on the best backend (>= 3 GPUs: nccl; "
                                   "1 GPU: local transport with virtual ranks; no GPU: gloo on CPU).")
    p.add_argument("--config", help="deployment JSON (default: the packaged seed_3gpu.json)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "local", "gloo"])
    p.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--seed", type=int, default=0, help="weights and tokens seed")
    p.add_argument("--schedule", choices=["gpipe", "asready"], help="override schedule.kind")
    p.add_argument("--micro-batches", type=int, help="override schedule.micro_batches")
    p.add_argument("--timeout", type=float, help="override comm.timeout_s (per action)")
    p.add_argument("--no-baselines", action="store_true", help="skip the no-overlap and m=1 variants")
    p.add_argument("--no-scale", action="store_true", help="on CPU, run the model at full size")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--trace", help="write a Perfetto/Chrome trace of the measured timeline")
    p.add_argument("--png", help="write a Gantt chart (PNG) of the measured timeline")
    p.add_argument("--dump", help="write tokens.pt, logits.pt and spec.json of the last iteration here")
    p.add_argument("--profile", action="store_true",
                   help="bracket the timed iterations with cudaProfilerStart/Stop (for nsys)")
    p.add_argument("--inject-fault", default="", help=argparse.SUPPRESS)  # testing: RANK:ACTION:exit|hang
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    from pyengine.spec import SpecError

    for name in ("iters", "warmup"):
        v = getattr(args, name)
        if v < (1 if name == "iters" else 0):
            raise SpecError(f"--{name}", v, "must be >= 1" if name == "iters" else "must be >= 0")
    for name in ("dump",):
        path = getattr(args, name)
        if path and os.path.exists(path) and not os.path.isdir(path):
            raise SpecError(f"--{name}", path, "exists and is not a directory")


def resolve_spec(args: argparse.Namespace):
    from pyengine.spec import load_spec

    spec = load_spec(args.config)
    changes: dict = {}
    if args.schedule:
        changes.setdefault("schedule", {})["kind"] = args.schedule
    if args.micro_batches is not None:
        changes.setdefault("schedule", {})["micro_batches"] = args.micro_batches
    if args.timeout is not None:
        changes["comm"] = {"timeout_s": args.timeout}
    return spec.replace(**changes) if changes else spec


def scale_for_cpu(spec):
    """Shrink H, F and V by the smallest power of two that fits the CPU budget; fp32 on CPU.
    Returns (spec, note); note is '' when nothing changed."""
    from pyengine import costs

    m = spec.model
    total = sum(costs.rank_flops(spec).values())
    d = 1
    while total / (d * d) > CPU_FLOP_BUDGET and min(m.hidden_size, m.ffn_hidden_size) // (2 * d) >= 16:
        d *= 2
    new = {"hidden_size": m.hidden_size // d, "ffn_hidden_size": m.ffn_hidden_size // d,
           "vocab_size": max(m.vocab_size // d, m.num_experts)}
    if m.dtype != "float32":
        new["dtype"] = "float32"
    changed = {k: (getattr(m, k), v) for k, v in new.items() if getattr(m, k) != v}
    if not changed:
        return spec, ""
    scaled = spec.replace(model=new)
    what = ", ".join(f"{k} {a}→{b}" for k, (a, b) in changed.items())
    note = (f"CPU backend: scaled the model ({what}) because the full size needs "
            f"{total / 1e9:.0f} GFLOP per batch and this run's budget is {CPU_FLOP_BUDGET / 1e9:.0f} "
            f"(fp32: CPU bf16 GEMMs are emulated). Tokens, experts, top-k and the layout are unchanged; "
            f"--no-scale runs full size.")
    return scaled, note


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    spec = resolve_spec(args)  # every config error surfaces here, before any process starts
    from pyengine import schedule
    from pyengine.launch import LaunchError, RunOptions, launch, pick_backend
    from pyengine.measure import variants
    from pyengine.run_report import print_summary, summarize, to_json

    backend = pick_backend(spec, args.backend)
    note = ""
    if backend == "gloo" and not args.no_scale:
        spec, note = scale_for_cpu(spec)
    table = schedule.build(spec)  # prove the tables before anything runs
    if args.inject_fault:
        _check_fault(args.inject_fault, table)
    iters, baselines = args.iters, not args.no_baselines
    if args.profile:  # a short, steady-state-only capture: no baseline variants in the trace
        iters, baselines = min(iters, PROFILE_ITERS), False
        print(f"--profile: {iters} timed iterations of the pipeline only, bracketed by "
              f"cudaProfilerStart/Stop", file=sys.stderr)
    opts = RunOptions(iters=iters, warmup=args.warmup, seed=args.seed, baselines=baselines,
                      profile=args.profile, fault=args.inject_fault)
    try:
        results = launch(spec, opts, backend)
    except LaunchError as e:
        print(f"pyengine run: {e}", file=sys.stderr)
        return 1
    if results is None:  # a non-zero torchrun rank: rank 0 reports for everyone
        return 0
    summary = summarize(spec, variants(spec, opts.baselines), results, backend=backend, scaled=note)
    tl = summary["variants"]["pipeline"]["timeline"]
    if args.trace or args.png:
        from pyengine import report

        if args.trace:
            report.write_trace(tl, args.trace)
        if args.png:
            report.write_gantt(tl, args.png, title=f"pyengine run ({backend}, measured)",
                               unit="GPU" if backend == "nccl" else "rank")
    if args.dump:
        _dump(args.dump, spec, results, args.seed)
    if args.json:
        print(json.dumps(to_json(summary), indent=2, default=float))
    else:
        print_summary(summary)
    return 0 if summary["check"]["ok"] else 1


def _check_fault(fault: str, table) -> None:
    from pyengine.spec import SpecError

    parts = fault.split(":")
    ok = (len(parts) == 3 and parts[0].isdigit() and parts[2] in ("exit", "hang")
          and any(a.id == parts[1] for a in table.get(int(parts[0]), [])))
    if not ok:
        raise SpecError("--inject-fault", fault, "must be RANK:ACTION_ID:exit|hang naming an action "
                                                 "in that rank's table")


def _dump(path: str, spec, results: list[dict], seed: int) -> None:
    import torch

    from pyengine.model import make_tokens

    os.makedirs(path, exist_ok=True)
    out_rank = spec.stage("output").gpus[0]
    torch.save(make_tokens(spec, seed), os.path.join(path, "tokens.pt"))
    m = spec.model
    logits = torch.from_numpy(results[out_rank]["logits"]).reshape(m.batch_size, m.seq_len, m.vocab_size)
    torch.save(logits, os.path.join(path, "logits.pt"))
    with open(os.path.join(path, "spec.json"), "w") as f:
        f.write(spec.to_json())
