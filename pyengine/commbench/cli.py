"""Options and entry of `pyengine bench comm` (also `python -m pyengine.commbench` under torchrun).

Flags follow nccl-tests: ``--op all_reduce|reduce_scatter|broadcast|sendrecv``,
``-b/--minbytes``, ``-e/--maxbytes`` (suffixes K, M, G: powers of 1024), ``-f/--stepfactor``,
``-n/--iters``, ``-w/--warmup_iters``, ``-c/--check 0|1``, ``-d/--datatype``, ``-r/--root``;
plus ``--backend nccl|gloo|local|auto``, ``--nranks``, ``--json`` and ``--timeout`` (seconds,
bounds every wait; the whole job is bounded by a multiple of it).

Backends (pyengine.execute.launch): gloo spawns ``--nranks`` CPU processes; local runs
``--nranks`` virtual ranks (threads) on one device; nccl spawns one process per GPU, or is one
rank of torchrun's: ``torchrun --nproc-per-node=N -m pyengine.commbench --backend nccl ...``.

Columns (as nccl-tests): size (B), count (elements; per-rank output count for reduce_scatter),
type, redop, root, time (us: per-iteration average, max over ranks), algbw = size / time
(GB/s), busbw = algbw x bus factor (pyengine.core.collectives) and #wrong (elements differing
from the exact expected result, summed over ranks; ``-c 0`` prints N/A). Each rank fills its
buffers with small integers that depend on (rank, index), so every result is exact in every
supported dtype and known in closed form. The exit status is 1 when any #wrong is non-zero.
"""

from __future__ import annotations

import argparse
import json
import re
import sys

from pyengine.commbench.collectives import OPS
from pyengine.core import dtypes
from pyengine.core.cli_help import Parser
from pyengine.core.errors import UsageError
from pyengine.core.limits import MAX_ITERS, MAX_TIMEOUT_S, MIN_TIMEOUT_S, TIMEOUT_WHY, check_number
from pyengine.execute.backends import BACKEND_CHOICES, BACKEND_HELP, Backend

DEFAULT_NRANKS = 3
DATATYPES = sorted({*dtypes.BYTES, *dtypes.ALIASES})


def parse_size(text: str) -> int:
    """'1K' -> 1024, '4M' -> 4 MiB, '1G', or plain bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 1024, 1K, 4M, 1G")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", choices=OPS, default="all_reduce", help="operation to time")
    # string defaults: argparse passes them through parse_size, and the help shows "32M"
    parser.add_argument("-b", "--minbytes", type=parse_size, default="32M",
                        help="smallest message, bytes (K/M/G suffixes: powers of 1024)")
    parser.add_argument("-e", "--maxbytes", type=parse_size, default="32M",
                        help="largest message, bytes (K/M/G suffixes: powers of 1024)")
    parser.add_argument("-f", "--stepfactor", type=int, default=2,
                        help="multiply the size by this factor between rows")
    parser.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size")
    parser.add_argument("-w", "--warmup_iters", type=int, default=5, help="untimed iterations per size first")
    parser.add_argument("-c", "--check", type=int, choices=(0, 1), default=1,
                        help="check results (#wrong): 1 yes, 0 no")
    parser.add_argument("-d", "--datatype", choices=DATATYPES, default="float", help="element type")
    parser.add_argument("-r", "--root", type=int, default=0, help="broadcast root rank")
    parser.add_argument("--backend", choices=BACKEND_CHOICES, default="auto", help=BACKEND_HELP)
    parser.add_argument("--nranks", type=int, default=None,
                        help=f"ranks (default: {DEFAULT_NRANKS}; under torchrun: WORLD_SIZE)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds bounding each wait; the whole job is bounded by a multiple")
    parser.add_argument("--corrupt-rank", type=int, default=None, help=argparse.SUPPRESS)


MAX_ROWS = 1000
"""Most sizes one sweep may hold (-f 1 adds -b each row: -b 1 -e 1G would be 10**9 rows)."""
MAX_NRANKS = 1024


def options(args: argparse.Namespace, nranks: int):
    """Checked options, or UsageError naming the flag: nothing runs on bad flags."""
    from pyengine.commbench.harness import BenchOptions, sizes

    def number(flag: str, value, **bounds) -> None:
        check_number(flag, value, error=UsageError, **bounds)

    number("--nranks", nranks, lo=1, hi=MAX_NRANKS, integer=True)
    number("-b", args.minbytes, lo=1, integer=True)
    if args.maxbytes < args.minbytes:
        raise UsageError("-e", args.maxbytes, f"must be >= -b ({args.minbytes})")
    number("-f", args.stepfactor, lo=1, integer=True)
    number("-n", args.iters, lo=1, hi=MAX_ITERS, integer=True)
    number("-w", args.warmup_iters, lo=0, hi=MAX_ITERS, integer=True)
    number("--timeout", args.timeout, lo=MIN_TIMEOUT_S, hi=MAX_TIMEOUT_S, why=TIMEOUT_WHY)
    if not 0 <= args.root < nranks:
        raise UsageError("-r", args.root, f"must be in [0, nranks={nranks})")
    rows = _row_count(args.minbytes, args.maxbytes, args.stepfactor)
    if rows > MAX_ROWS:
        raise UsageError("-f", args.stepfactor, f"makes {rows} sizes from -b {args.minbytes} to -e "
                                                f"{args.maxbytes}; at most {MAX_ROWS}")
    if args.op == "sendrecv" and nranks < 2:
        raise UsageError("--nranks", nranks, "sendrecv needs at least 2 ranks (each sends to the next)")
    sweep = _runnable_sizes(args, nranks, sizes(args.minbytes, args.maxbytes, args.stepfactor))
    return BenchOptions(op=args.op, sizes=sweep,
                        dtype=dtypes.canonical(args.datatype), iters=args.iters,
                        warmup=args.warmup_iters, check=bool(args.check), root=args.root,
                        timeout_s=args.timeout, corrupt_rank=args.corrupt_rank,
                        show_progress=not args.json)


def _runnable_sizes(args: argparse.Namespace, nranks: int, sweep: tuple[int, ...]) -> tuple[int, ...]:
    """The sweep, refused when no size holds one element per rank's output (the harness skips
    such sizes: an empty table would look like a run)."""
    from pyengine.commbench.collectives import TESTS
    from pyengine.core.collectives import Collective

    test, elt = TESTS[Collective(args.op)], dtypes.nbytes(dtypes.canonical(args.datatype))
    if not any(test.counts(size, elt, nranks)[1] for size in sweep):
        unit = f"{nranks} ranks x {elt} B per element" if test.scatters else f"{elt} B per element"
        raise UsageError("-e", args.maxbytes, f"no size from -b {args.minbytes} holds one element "
                                              f"per rank for {args.op} ({unit}: at least "
                                              f"{(nranks if test.scatters else 1) * elt} B)")
    return sweep


def _row_count(lo: int, hi: int, factor: int) -> int:
    if factor < 2:
        return hi // lo
    rows, size = 0, lo
    while size <= hi:
        rows, size = rows + 1, size * factor
    return rows


def check_memory(opts, backend: Backend, nranks: int) -> None:
    """-e (the largest buffers) must fit this machine's memory for `backend` (exit 2 otherwise)."""
    from pyengine.core.units import fmt_bytes

    b = backend.memory_budget(nranks)
    if b is None:
        return
    size = max(opts.sizes)
    count = size // dtypes.nbytes(opts.dtype)
    per_rank = 2 * size + (48 * count if opts.check else 0)  # in + out; int64/float64 check copies
    need = per_rank * nranks + b.per_rank_overhead * nranks if b.shared else per_rank
    if b.shared and b.per_rank_overhead * nranks >= b.bytes:  # no buffer size could fit
        raise UsageError("--nranks", nranks, f"{nranks} rank processes need "
                                             f"{fmt_bytes(b.per_rank_overhead * nranks)} "
                                             f"({fmt_bytes(b.per_rank_overhead)} each) before any "
                                             f"buffer; {fmt_bytes(b.bytes)} of {b.what} is available")
    if need > b.bytes:
        proc = f" + {fmt_bytes(b.per_rank_overhead)} of process" if b.per_rank_overhead else ""
        what = (f"{nranks} ranks x ({fmt_bytes(per_rank)} of buffers{proc})" if b.shared
                else f"{fmt_bytes(per_rank)} per rank")
        raise UsageError("-e", size, f"buffers need {fmt_bytes(need)} ({what}); {fmt_bytes(b.bytes)} "
                                     f"of {b.what} is available")


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark described by ``args``; prints; returns the exit status."""
    from pyengine.commbench.harness import bench_rank, combine
    from pyengine.core import provenance
    from pyengine.execute.launch import (LaunchError, bind, check_backend, pick_backend, run_ranks,
                                         torchrun_env)
    from pyengine.report.comm_table import format_table

    env = torchrun_env()
    nranks = (env.world_size if env is not None
              else args.nranks if args.nranks is not None else DEFAULT_NRANKS)
    opts = options(args, nranks)
    backend = pick_backend(nranks, args.backend)
    check_backend(backend, nranks)
    check_memory(opts, backend, nranks)
    try:
        per_rank = run_ranks(bind(bench_rank, opts), nranks, backend=backend,
                             groups=[tuple(range(nranks))], timeout_s=opts.timeout_s,
                             job_timeout_s=opts.timeout_s * (len(opts.sizes) + 2) + 60)
    except LaunchError as e:
        print(f"pyengine bench comm: {e}", file=sys.stderr)
        return 1
    if per_rank is None:
        return 0  # a non-zero torchrun rank: rank 0 prints
    import torch

    device = torch.device("cuda", torch.cuda.current_device()) if backend.on_gpu() else torch.device("cpu")
    rows = combine(per_rank, opts.op, nranks)
    meta = {"op": opts.op, "backend": backend.value, "nranks": nranks,
            "type": dtypes.NCCL_TESTS_NAMES.get(opts.dtype, opts.dtype),
            "root": opts.root, "iters": opts.iters, "warmup": opts.warmup, "check": opts.check,
            **provenance.record(device, "pyengine.commbench")}
    print(json.dumps({"meta": meta, "rows": rows}, indent=2) if args.json else format_table(meta, rows))
    return 1 if any(r["wrong"] > 0 for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = Parser(prog="python -m pyengine.commbench", description="nccl-tests-style comm benchmark")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UsageError as e:
        print(f"{parser.prog}: {e.kind}: {e}", file=sys.stderr)
        return 2
