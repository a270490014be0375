"""`pyengine run`: the main job. Validates everything first, then starts the ranks."""

from __future__ import annotations

import argparse
import json
import os
import sys

from pyengine.core.cli_help import TOKENS_HELP
from pyengine.execute.backends import BACKEND_CHOICES, BACKEND_HELP

PROFILE_ITERS = 5
DUMP_FILES = ("tokens.pt", "logits.pt", "spec.json")
"""What --dump writes, in this order."""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="run the 3-stage pipeline end to end and report measurements",
                       description="Runs the deployment on the best backend (>= 3 GPUs: nccl; "
                                   "1 GPU: local transport with virtual ranks; no GPU: gloo on CPU).")
    p.add_argument("--config", help="deployment JSON (default: the packaged seed_3gpu.json); with "
                                    "--weights its model sizes may be left out (they are the checkpoint's)")
    p.add_argument("--weights", metavar="DIR", help="Hugging Face model folder (config.json + safetensors): "
                                                    "run the whole model from it (every layer with its attention)")
    p.add_argument("--layer", type=int, default=None, help="run only this decoder layer of --weights, as the "
                                                           "attention-free MoE block (default: the whole model)")
    p.add_argument("--tokens", metavar="FILE", help=f"{TOKENS_HELP} (default: seeded ids of the config's shape)")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--seed", type=int, default=0, help="seed of the seeded weights and tokens")
    p.add_argument("--schedule", choices=["gpipe", "asready"], help="override schedule.kind (default: the config's)")
    p.add_argument("--micro-batches", type=int, help="override schedule.micro_batches (default: the config's)")
    p.add_argument("--timeout", type=float, help="override comm.timeout_s: seconds per action (default: the config's)")
    p.add_argument("--no-baselines", action="store_true", help="skip the no-overlap and m=1 variants")
    p.add_argument("--no-scale", action="store_true", help="on CPU, run the model at full size")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--trace", help="write a Perfetto/Chrome trace of the measured timeline")
    p.add_argument("--png", help="write a Gantt chart (PNG) of the measured timeline")
    p.add_argument("--dump", help="write tokens.pt, logits.pt and spec.json of the last iteration here")
    p.add_argument("--profile", action="store_true",
                   help="bracket the timed iterations with cudaProfilerStart/Stop (for nsys); no effect on CPU")
    p.add_argument("--inject-fault", default="", help=argparse.SUPPRESS)  # testing: RANK:ACTION:exit|hang|nan
    p.set_defaults(func=run)


def _check_args(args: argparse.Namespace) -> None:
    """Every flag, before the config is read: numbers in range, output paths writable."""
    from pyengine.cli.paths import PNG_EXTENSIONS, TRACE_EXTENSIONS, check_apart, check_dir, check_file
    from pyengine.core.errors import UsageError
    from pyengine.core.limits import MAX_ITERS, MAX_SEED, MAX_TIMEOUT_S, MIN_TIMEOUT_S, TIMEOUT_WHY, check_number

    check_number("--iters", args.iters, lo=1, hi=MAX_ITERS, integer=True, error=UsageError)
    check_number("--warmup", args.warmup, lo=0, hi=MAX_ITERS, integer=True, error=UsageError)
    check_number("--seed", args.seed, lo=0, hi=MAX_SEED, integer=True, error=UsageError)
    if args.timeout is not None:
        check_number("--timeout", args.timeout, lo=MIN_TIMEOUT_S, hi=MAX_TIMEOUT_S, error=UsageError,
                     why=TIMEOUT_WHY)
    check_file("--trace", args.trace, TRACE_EXTENSIONS)
    check_file("--png", args.png, PNG_EXTENSIONS)
    check_dir("--dump", args.dump, DUMP_FILES)
    check_apart({"--trace": args.trace, "--png": args.png}, "--dump", args.dump, DUMP_FILES)
    if args.layer is not None and not args.weights:
        raise UsageError("--layer", args.layer, "needs --weights (a layer of which checkpoint?)")


def open_inputs(args: argparse.Namespace):
    """(checkpoint weight source or None, token ids or None), each validated before any rank starts."""
    source = tokens = None
    if args.weights:
        from pyengine.cli.checkpoint_arg import open_weights

        source = open_weights(args.weights, args.layer)  # no --layer: the whole model
    if args.tokens:
        from pyengine.model.tokens import load_tokens

        tokens = load_tokens(args.tokens)
    return source, tokens


def resolve_spec(args: argparse.Namespace, source=None, tokens=None):
    """The config (or, with a checkpoint, the config's layout around the checkpoint's model
    sizes) with the flags that override it, then the batch shape of a --tokens file."""
    from pyengine.cli.config_arg import flag_blame, flagged_config
    from pyengine.core.errors import SpecError
    from pyengine.core.spec import DeploymentSpec

    data = flagged_config(args, layout_only=source is not None)
    try:
        if source is None:
            spec = DeploymentSpec.from_dict(data)
        else:
            from pyengine.model.hf_config import deployment_spec

            spec = deployment_spec(source.hf, data, whole=source.layer is None)
        if tokens is not None:
            spec = spec.replace(model={"batch_size": tokens.shape[0], "seq_len": tokens.shape[1]})
    except SpecError as e:
        raise flag_blame(args, e) from None
    return spec


def _fault(text: str, table):
    from pyengine.core.errors import UsageError
    from pyengine.execute.faults import MODES, Fault

    try:
        fault = Fault.parse(text)
    except ValueError:
        fault = None
    if fault is None or not any(a.id == fault.action for a in table.get(fault.rank, [])):
        raise UsageError("--inject-fault", text, f"must be RANK:ACTION_ID:{'|'.join(MODES)} naming "
                                                 "an action in that rank's table")
    return fault


def run(args: argparse.Namespace) -> int:
    _check_args(args)
    source, tokens = open_inputs(args)
    spec = resolve_spec(args, source, tokens)  # every config error surfaces here, before any process starts
    from pyengine.cli.fit import check_run_fits
    from pyengine.execute.launch import LaunchError, bind, check_backend, pick_backend, run_ranks
    from pyengine.execute.measure import STREAM_BATCHES, RunOptions, measure_rank, stream_spec, variants
    from pyengine.execute.scaling import scale_for_cpu
    from pyengine.model.stages import rank_flops
    from pyengine.report.run_summary import summarize
    from pyengine.report.run_view import print_summary
    from pyengine.schedule import build

    backend = pick_backend(spec.world_size, args.backend)
    check_backend(backend, spec.world_size)
    note = ""
    on_cpu = not backend.on_gpu()
    if on_cpu and not args.no_scale and source is None:
        spec, note = scale_for_cpu(spec)
    if tokens is not None:
        from pyengine.model.tokens import check_ids

        check_ids(tokens, spec.model.vocab_size, " (the model was scaled for CPU: --no-scale keeps it)"
                  if note else "")
    table = build(spec)  # prove the tables before anything runs
    fault = _fault(args.inject_fault, table) if args.inject_fault else None
    iters, baselines = args.iters, not args.no_baselines
    if on_cpu and source is not None:  # a checkpoint's sizes are its own
        gflop = sum(rank_flops(spec).values()) / 1e9
        print(f"CPU backend: the checkpoint runs at its own size ({gflop:.3g} GFLOP per batch), never "
              f"scaled; a layer too big for this CPU is slow or runs out of memory", file=sys.stderr)
    if args.profile:  # a short, steady-state-only capture: no baseline variants in the trace
        iters, baselines = min(iters, PROFILE_ITERS), False
        print(f"--profile: {iters} timed iterations of the pipeline only, bracketed by "
              f"cudaProfilerStart/Stop", file=sys.stderr)
    opts = RunOptions(iters=iters, warmup=args.warmup, seed=args.seed, baselines=baselines,
                      profile=args.profile, fault=fault, source=source, tokens=tokens,
                      show_progress=not args.json)
    runs = list(variants(spec, baselines).values())
    check_run_fits(spec, runs + [stream_spec(v, STREAM_BATCHES) for v in runs], backend, scaled=bool(note))
    groups = spec.comm_groups()
    try:
        results = run_ranks(bind(measure_rank, spec, opts), spec.world_size, backend=backend,
                            groups=groups, timeout_s=spec.comm.timeout_s,
                            job_timeout_s=spec.comm.timeout_s * 4 + 120)  # no rank progressing
        # for this long (start-up included) ends the job; a long healthy run is never cut short
    except LaunchError as e:
        print(f"pyengine run: {e}", file=sys.stderr)
        return 1
    if results is None:  # a non-zero torchrun rank: rank 0 reports for everyone
        return 0
    summary = summarize(spec, variants(spec, opts.baselines), results, backend=backend, scaled=note,
                        weights=opts.weights().describe())
    if args.json:
        from pyengine.report.jsonable import to_jsonable

        print(json.dumps(to_jsonable(summary), indent=2))
    else:
        print_summary(summary)
    sys.stdout.flush()  # the results stand even if writing a file below fails
    written = _write_artifacts(args, summary, spec, results, backend, opts.ids(spec))
    if not summary.check.ok:
        print(f"pyengine run: output check failed: {summary.check.wrong} of {summary.check.elements} "
              f"logits wrong or not finite", file=sys.stderr)
    return 0 if summary.check.ok and written else 1


def _write_artifacts(args, summary, spec, results, backend, ids) -> bool:
    from pyengine.cli.paths import write_outputs

    tl = summary.variants["pipeline"].timeline

    def trace() -> None:
        from pyengine.report.trace import write_trace

        write_trace(tl, args.trace)

    def png() -> None:
        from pyengine.report.gantt import write_gantt
        from pyengine.report.run_view import chart_title

        write_gantt(tl, args.png, title=chart_title(summary), unit=backend.rank_unit)

    writes = [(flag, path, fn) for flag, path, fn in (
        ("--trace", args.trace, trace), ("--png", args.png, png),
        ("--dump", args.dump, lambda: _dump(args.dump, spec, results, ids))) if path]
    return len(write_outputs("run", writes)) == len(writes)


def _dump(target: str, spec, results, ids) -> None:
    import torch

    from pyengine.cli.paths import fresh_dir

    with fresh_dir(target) as path:  # whole or not at all, even with runs side by side
        out = results[spec.stage("output").gpus[0]]
        tokens, logits_file, spec_file = DUMP_FILES
        torch.save(ids, os.path.join(path, tokens))
        m = spec.model
        logits = torch.from_numpy(out.logits).reshape(m.batch_size, m.seq_len, m.vocab_size)
        torch.save(logits, os.path.join(path, logits_file))
        with open(os.path.join(path, spec_file), "w") as f:
            f.write(spec.to_json())
