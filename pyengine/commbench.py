"""``pyengine bench comm``: nccl-tests-style communication benchmark over any transport.

Flags follow nccl-tests: ``--op all_reduce|reduce_scatter|broadcast|sendrecv``,
``-b/--minbytes``, ``-e/--maxbytes`` (suffixes K, M, G: powers of 1024), ``-f/--stepfactor``,
``-n/--iters``, ``-w/--warmup_iters``, ``-c/--check 0|1``, ``-d/--datatype``, ``-r/--root``;
plus ``--backend nccl|gloo|local|auto``, ``--nranks``, ``--json`` and ``--timeout`` (seconds,
bounds every wait; the whole job is bounded by a multiple of it).

Backends:
* gloo  — spawns ``--nranks`` CPU processes itself (pyengine.procs.spawn_ranks).
* local — ``--nranks`` virtual ranks (threads) on one device: CUDA if present, else CPU.
* nccl  — one process per GPU under torchrun:
  ``torchrun --nproc-per-node=N -m pyengine.commbench --backend nccl ...``; without
  torchrun's environment it runs one rank on GPU 0.

Columns (as nccl-tests): size (B), count (elements; per-rank output count for
reduce_scatter), type, redop, root, time (us: per-iteration average, max over ranks),
algbw = size / time (GB/s), busbw = algbw x bus factor (all_reduce 2(n-1)/n,
reduce_scatter (n-1)/n, broadcast 1, sendrecv 1) and #wrong (elements differing from
the exact expected result, summed over ranks; ``-c 0`` prints N/A). Each rank fills
its buffers with small integers that depend on (rank, index), so every result is
exact in every supported dtype (float16/bfloat16 included) and known in closed form.
sendrecv: rank r sends to r+1 and receives from r-1 (mod n).

Timing: CUDA events on the caller's stream on GPU; time.perf_counter around completed
ops on CPU. The exit status is 1 when any #wrong is non-zero.

Testing flag (hidden from --help): ``--corrupt-rank R`` makes rank R overwrite the
first element of its result before the check, so tests can prove #wrong counting works.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from pyengine import provenance

__all__ = ["add_arguments", "run", "main", "parse_size", "bus_factor", "bench_rank", "combine"]

OPS = ("all_reduce", "reduce_scatter", "broadcast", "sendrecv")
DTYPES = {
    "float": torch.float32, "float32": torch.float32,
    "half": torch.float16, "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int32": torch.int32, "int": torch.int32,
    "int64": torch.int64,
    "uint8": torch.uint8,
    "double": torch.float64, "float64": torch.float64,
}
_TYPE_NAMES = {torch.float32: "float", torch.float16: "half", torch.bfloat16: "bfloat16",
               torch.int32: "int32", torch.int64: "int64", torch.uint8: "uint8",
               torch.float64: "double"}


def bus_factor(op: str, nranks: int) -> float:
    """nccl-tests' bus bandwidth factor."""
    if op == "all_reduce":
        return 2.0 * (nranks - 1) / nranks
    if op == "reduce_scatter":
        return (nranks - 1) / nranks
    return 1.0



def parse_size(text: str) -> int:
    """'1K' -> 1024, '4M' -> 4 MiB, '1G', or plain bytes."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[bB]?\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r}: expected e.g. 1024, 1K, 4M, 1G")
    return int(m.group(1)) * {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[m.group(2).lower()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--op", choices=OPS, default="all_reduce")
    parser.add_argument("-b", "--minbytes", type=parse_size, default=parse_size("32M"),
                        help="smallest message (bytes; K/M/G suffixes)")
    parser.add_argument("-e", "--maxbytes", type=parse_size, default=parse_size("32M"),
                        help="largest message (bytes; K/M/G suffixes)")
    parser.add_argument("-f", "--stepfactor", type=int, default=2,
                        help="multiply the size by this factor between rows")
    parser.add_argument("-n", "--iters", type=int, default=20, help="timed iterations per size")
    parser.add_argument("-w", "--warmup_iters", type=int, default=5, help="untimed iterations")
    parser.add_argument("-c", "--check", type=int, choices=(0, 1), default=1,
                        help="check results (#wrong)")
    parser.add_argument("-d", "--datatype", choices=sorted(DTYPES), default="float")
    parser.add_argument("-r", "--root", type=int, default=0, help="broadcast root")
    parser.add_argument("--backend", choices=("auto", "nccl", "gloo", "local"), default="auto",
                        help="auto: nccl under torchrun, local with a GPU, else gloo")
    parser.add_argument("--nranks", type=int, default=None,
                        help="ranks for gloo/local (default 3); nccl takes WORLD_SIZE")
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds bounding each wait")
    parser.add_argument("--corrupt-rank", type=int, default=None, help=argparse.SUPPRESS)


@dataclass(frozen=True)
class BenchOptions:
    """Everything a rank needs (picklable: travels to spawned ranks)."""

    op: str
    sizes: tuple[int, ...]
    dtype: str
    iters: int
    warmup: int
    check: bool
    root: int
    timeout_s: float
    corrupt_rank: int | None


def _sizes(minbytes: int, maxbytes: int, factor: int) -> tuple[int, ...]:
    if minbytes <= 0 or maxbytes < minbytes:
        raise ValueError(f"need 0 < minbytes <= maxbytes, got -b {minbytes} -e {maxbytes}")
    if factor < 2:
        return (minbytes,) if minbytes == maxbytes else tuple(range(minbytes, maxbytes + 1, minbytes))
    out, size = [], minbytes
    while size <= maxbytes:
        out.append(size)
        size *= factor
    return tuple(out)


# -- per-rank body ---------------------------------------------------------------------------

def fill_value(rank: int, index: torch.Tensor) -> torch.Tensor:
    """Small integers in [0, 7] (exact in every dtype, sums exact for up to 32 ranks in bf16)."""
    return (index * 3 + rank * 5 + 1) % 8


def _counts(op: str, size: int, elt: int, n: int) -> tuple[int, int]:
    """(elements in this rank's input buffer, elements in its output buffer)."""
    count = size // elt
    if op == "reduce_scatter":
        per = count // n
        return per * n, per
    return count, count


def _expected(op: str, rank: int, n: int, root: int, count_out: int) -> torch.Tensor:
    idx = torch.arange(count_out, dtype=torch.int64)
    if op == "all_reduce":
        return sum(fill_value(r, idx) for r in range(n))
    if op == "reduce_scatter":
        return sum(fill_value(r, idx + rank * count_out) for r in range(n))
    if op == "broadcast":
        return fill_value(root, idx)
    return fill_value((rank - 1) % n, idx)  # sendrecv: from the previous rank


class _Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def start(self) -> None:
        if self.cuda:
            self._s = torch.cuda.Event(enable_timing=True)
            self._e = torch.cuda.Event(enable_timing=True)
            self._s.record(torch.cuda.current_stream(self.device))
        else:
            self._t = time.perf_counter()

    def stop_us(self) -> float:
        if self.cuda:
            self._e.record(torch.cuda.current_stream(self.device))
            self._e.synchronize()
            return self._s.elapsed_time(self._e) * 1e3
        return (time.perf_counter() - self._t) * 1e6


def _issue(transport: Any, op: str, inp: torch.Tensor, out: torch.Tensor, root: int,
           group: tuple[int, ...], name: str) -> list[Any]:
    n, r = transport.world_size, transport.rank
    if op == "all_reduce":
        return [transport.all_reduce(inp, group, name=name)]
    if op == "reduce_scatter":
        return [transport.reduce_scatter(out, inp, group, name=name)]
    if op == "broadcast":
        return [transport.broadcast(inp, root, group, name=name)]
    if n == 1:  # a rank sending to itself: NCCL needs the pair in one group
        grouped = getattr(transport, "group", None)
        if grouped is not None:
            with grouped():
                return [transport.send(inp, r, name=name), transport.recv(out, r, name=name)]
    return [transport.send(inp, (r + 1) % n, name=name), transport.recv(out, (r - 1) % n, name=name)]


def _complete(handles: list[Any], timeout_s: float, host_sync: bool) -> None:
    for h in handles:
        h.wait(timeout_s)
    if host_sync:
        for h in handles:
            sync = getattr(h, "synchronize", None)
            if sync is not None:
                sync(timeout_s)


def bench_rank(transport: Any, opts: BenchOptions) -> list[dict]:
    """Runs every size on this rank; returns rows with this rank's time_us and #wrong."""
    dtype = DTYPES[opts.dtype]
    device = transport.device
    n, rank = transport.world_size, transport.rank
    group = tuple(range(n))
    elt = torch.empty((), dtype=dtype).element_size()
    timer = _Timer(device)
    rows = []
    for size in opts.sizes:
        count_in, count_out = _counts(opts.op, size, elt, n)
        if count_out == 0:
            continue
        inplace = opts.op in ("all_reduce", "broadcast")
        inp = torch.empty(count_in, dtype=dtype, device=device)
        out = inp if inplace else torch.empty(count_out, dtype=dtype, device=device)
        name = f"{opts.op}_{size}B"
        wrong = -1
        if opts.check:
            inp.copy_(fill_value(rank, torch.arange(count_in)).to(dtype))
            if not inplace:
                out.fill_(0)
            _complete(_issue(transport, opts.op, inp, out, opts.root, group, name + "_check"),
                      opts.timeout_s, host_sync=True)
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()
            if opts.corrupt_rank == rank:
                out[0] = out[0] + 1  # testing hook: a planted wrong element
            expected = _expected(opts.op, rank, n, opts.root, count_out)
            got = out.cpu().to(torch.float64)  # small integers: exact in float64
            wrong = int((got != expected.to(torch.float64)).sum())
        inp.zero_()  # timed runs on zeros: sums stay finite however many iterations run
        for _ in range(opts.warmup):
            _complete(_issue(transport, opts.op, inp, out, opts.root, group, name), opts.timeout_s,
                      host_sync=False)
        transport.barrier()
        timer.start()
        for _ in range(opts.iters):
            _complete(_issue(transport, opts.op, inp, out, opts.root, group, name), opts.timeout_s,
                      host_sync=False)
        time_us = timer.stop_us() / max(1, opts.iters)
        rows.append({"size": count_in * elt,
                     "count": count_out, "time_us": time_us, "wrong": wrong})
    return rows


def _gloo_rank(rank: int, nranks: int, port: int, opts: BenchOptions) -> list[dict]:
    from pyengine.procs import connect_store
    from pyengine.transport import create_transport

    torch.set_num_threads(1)
    store = connect_store(rank, nranks, port, timeout_s=opts.timeout_s)
    with create_transport("gloo", rank=rank, world_size=nranks, device="cpu",
                          groups=[tuple(range(nranks))], store=store,
                          timeout_s=opts.timeout_s) as transport:
        return bench_rank(transport, opts)


def _run_gloo(nranks: int, opts: BenchOptions, job_timeout_s: float) -> list[list[dict]]:
    from pyengine.procs import spawn_ranks

    return spawn_ranks(_gloo_rank, nranks, args=(opts,), timeout_s=job_timeout_s,
                       env={"OMP_NUM_THREADS": "1"})


def _run_local(nranks: int, device: torch.device, opts: BenchOptions,
               job_timeout_s: float) -> list[list[dict]]:
    from pyengine.transport.local import LocalTransport

    transports = LocalTransport.create(nranks, device, opts.timeout_s)
    results: list[Any] = [None] * nranks
    errors: dict[int, BaseException] = {}

    def body(r: int) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            results[r] = bench_rank(transports[r], opts)
        except BaseException as exc:  # re-raised below with the rank named
            errors[r] = exc

    threads = [threading.Thread(target=body, args=(r,), name=f"commbench-vrank{r}", daemon=True)
               for r in range(nranks)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + job_timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    for t in transports:
        t.close()
    if errors:
        r = min(errors)
        raise RuntimeError(f"virtual rank {r} failed: {errors[r]}") from errors[r]
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    if stuck:
        raise RuntimeError(f"virtual ranks {stuck} still running after {job_timeout_s:g} s")
    return results


def _run_nccl(opts: BenchOptions) -> tuple[list[list[dict]] | None, int, torch.device]:
    """Under torchrun: every rank benchmarks; rank 0 gathers rows through the store and
    returns them (other ranks return None)."""
    import torch.distributed as dist

    from pyengine.transport import create_transport

    rank = int(os.environ.get("RANK", "0"))
    nranks = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", rank))
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    store = dist.HashStore() if nranks == 1 and "MASTER_PORT" not in os.environ else None
    with create_transport("nccl", rank=rank, world_size=nranks, device=device,
                          groups=[tuple(range(nranks))], store=store,
                          timeout_s=opts.timeout_s) as transport:
        rows = bench_rank(transport, opts)
        store = transport.store
        store.set(f"pyengine/commbench/rows/{rank}", json.dumps(rows))
        if rank != 0:
            return None, nranks, device
        keys = [f"pyengine/commbench/rows/{r}" for r in range(nranks)]
        store.wait(keys, datetime.timedelta(seconds=opts.timeout_s))
        return [json.loads(store.get(k)) for k in keys], nranks, device


# -- reporting ---------------------------------------------------------------------------------

def combine(per_rank: list[list[dict]], op: str, nranks: int) -> list[dict]:
    """nccl-tests' reduction over ranks: max time, summed #wrong; adds algbw/busbw."""
    rows = []
    for cells in zip(*per_rank):
        time_us = max(c["time_us"] for c in cells)
        wrong = sum(c["wrong"] for c in cells) if all(c["wrong"] >= 0 for c in cells) else -1
        size = cells[0]["size"]
        algbw = size / (time_us * 1e-6) / 1e9 if time_us > 0 else 0.0
        rows.append({"size": size, "count": cells[0]["count"], "time_us": time_us,
                     "algbw_GBps": algbw, "busbw_GBps": algbw * bus_factor(op, nranks),
                     "wrong": wrong})
    return rows


def format_table(meta: dict, rows: list[dict]) -> str:
    lines = [
        f"# pyengine bench comm: op {meta['op']}, backend {meta['backend']}, nranks {meta['nranks']}, "
        f"device {meta['device']}",
        f"# date {meta['date']}, commit {meta['commit']}, torch {meta['torch']}",
        f"# command: {meta['command']}",
        f"# iters {meta['iters']}, warmup {meta['warmup']}, check {int(meta['check'])}",
        "#",
        f"# {'size':>10} {'count':>12} {'type':>9} {'redop':>6} {'root':>5} "
        f"{'time':>10} {'algbw':>8} {'busbw':>8} {'#wrong':>7}",
        f"# {'(B)':>10} {'(elements)':>12} {'':>9} {'':>6} {'':>5} "
        f"{'(us)':>10} {'(GB/s)':>8} {'(GB/s)':>8} {'':>7}",
    ]
    redop = "sum" if meta["op"] in ("all_reduce", "reduce_scatter") else "none"
    root = str(meta["root"]) if meta["op"] == "broadcast" else "-1"
    for r in rows:
        wrong = "N/A" if r["wrong"] < 0 else str(r["wrong"])
        lines.append(f"  {r['size']:>10} {r['count']:>12} {meta['type']:>9} {redop:>6} {root:>5} "
                     f"{r['time_us']:>10.1f} {r['algbw_GBps']:>8.3f} {r['busbw_GBps']:>8.3f} "
                     f"{wrong:>7}")
    total_wrong = sum(max(0, r["wrong"]) for r in rows)
    avg = sum(r["busbw_GBps"] for r in rows) / len(rows) if rows else 0.0
    lines.append(f"# Out of bounds values : {total_wrong} {'OK' if total_wrong == 0 else 'FAILED'}")
    lines.append(f"# Avg bus bandwidth    : {avg:.4g}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Runs the benchmark described by ``args`` (see add_arguments); prints; returns the
    exit status (1 when any result was wrong)."""
    dtype = DTYPES[args.datatype]
    backend = args.backend
    if backend == "auto":
        backend = ("nccl" if "RANK" in os.environ and torch.cuda.is_available()
                   else "local" if torch.cuda.is_available() else "gloo")
    if backend == "nccl" and dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.int32,
                                           torch.int64, torch.uint8, torch.float64):
        raise ValueError(f"datatype {args.datatype} unsupported by nccl")
    opts = BenchOptions(op=args.op, sizes=_sizes(args.minbytes, args.maxbytes, args.stepfactor),
                        dtype=args.datatype, iters=args.iters, warmup=args.warmup_iters,
                        check=bool(args.check), root=args.root, timeout_s=args.timeout,
                        corrupt_rank=args.corrupt_rank)
    job_timeout_s = args.timeout * (len(opts.sizes) + 2) + 60
    world = int(os.environ.get("WORLD_SIZE", "1")) if backend == "nccl" else (args.nranks or 3)
    if world < 1 or not 0 <= args.root < world:
        raise ValueError(f"need nranks >= 1 and 0 <= --root < nranks, got {world} and {args.root}")
    if backend == "nccl":
        per_rank, nranks, device = _run_nccl(opts)
        if per_rank is None:
            return 0  # rank 0 prints
    else:
        nranks = world
        if backend == "gloo":
            device = torch.device("cpu")
            per_rank = _run_gloo(nranks, opts, job_timeout_s)
        else:
            device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                      else torch.device("cpu"))
            per_rank = _run_local(nranks, device, opts, job_timeout_s)
    rows = combine(per_rank, opts.op, nranks)
    meta = {"op": opts.op, "backend": backend, "nranks": nranks,
            "type": _TYPE_NAMES[dtype], "root": opts.root, "iters": opts.iters,
            "warmup": opts.warmup, "check": opts.check,
            **provenance.record(device, "pyengine.commbench")}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=2))
    else:
        print(format_table(meta, rows))
    return 1 if any(r["wrong"] > 0 for r in rows) else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pyengine.commbench",
                                     description="nccl-tests-style comm benchmark")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
