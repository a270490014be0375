"""The per-rank harness of `pyengine bench comm`: for every size, check one call against the
closed-form result (#wrong), warm up, then time `iters` calls (CUDA events on GPU,
perf_counter on CPU). Every collective goes through the same code; only its record differs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pyengine.commbench.collectives import TESTS, fill_value
from pyengine.core import dtypes
from pyengine.core.collectives import Collective
from pyengine.core.progress import progress
from pyengine.execute.launch import RankContext
from pyengine.execute.timer import Timer
from pyengine.transport.base import complete


@dataclass(frozen=True)
class BenchOptions:
    """Everything a rank needs (picklable: travels to spawned ranks)."""

    op: str
    sizes: tuple[int, ...]
    dtype: str
    """Canonical dtype name (pyengine.core.dtypes)."""
    iters: int
    warmup: int
    check: bool
    root: int
    timeout_s: float
    corrupt_rank: int | None = None
    """Testing hook: this rank overwrites one element of its result before the check."""
    show_progress: bool = False
    """Rank 0 draws a bar over the sizes (on a terminal only: pyengine.core.progress)."""


@dataclass(slots=True)
class RankRow:
    size: int
    count: int
    time_us: float
    wrong: int
    """Elements differing from the expected result; -1 when not checked."""


def sizes(minbytes: int, maxbytes: int, factor: int) -> tuple[int, ...]:
    """nccl-tests' size sweep: minbytes, x factor, ..., up to maxbytes (factor < 2: +minbytes)."""
    if factor < 2:
        return (minbytes,) if minbytes == maxbytes else tuple(range(minbytes, maxbytes + 1, minbytes))
    out, size = [], minbytes
    while size <= maxbytes:
        out.append(size)
        size *= factor
    return tuple(out)


def bench_rank(ctx: RankContext, opts: BenchOptions) -> list[RankRow]:
    """Runs every size on this rank; returns its time and #wrong per size."""
    test = TESTS[Collective(opts.op)]
    tr, n = ctx.transport, ctx.world_size
    dtype = dtypes.torch_dtype(opts.dtype)
    group = tuple(range(n))
    elt = dtypes.nbytes(opts.dtype)
    timer = Timer(ctx.device)
    rows = []
    draw = opts.show_progress and ctx.rank == 0
    with progress(len(opts.sizes), f"bench comm {opts.op}", enabled=draw) as advance:
        for size in opts.sizes:
            count_in, count_out = test.counts(size, elt, n)
            if count_out == 0:
                advance()
                continue
            inp = torch.empty(count_in, dtype=dtype, device=ctx.device)
            out = inp if test.inplace else torch.empty(count_out, dtype=dtype, device=ctx.device)
            name = f"{opts.op}_{size}B"
            ctx.on_action(name, True)  # progress for the launcher's liveness board; a bench rank
            # mostly waits on its peers' side of the collective, so it never counts as stalled

            def call(tag: str = "", host_sync: bool = False) -> None:
                handles = test.issue(tr, inp, out, opts.root, group, name + tag)
                if host_sync:
                    complete(handles, opts.timeout_s)
                else:  # GPU: only orders the current stream, so the timed calls queue back to back
                    for h in handles:
                        h.wait(opts.timeout_s)

            wrong = _check(ctx, test, opts, inp, out, count_in, count_out, call) if opts.check else -1
            inp.zero_()  # timed runs on zeros: sums stay finite however many iterations run
            for _ in range(opts.warmup):
                call()
            ctx.barrier()
            start = timer.mark()
            for _ in range(opts.iters):
                call()
            time_us = timer.elapsed(start, timer.mark()) * 1e6 / max(1, opts.iters)
            rows.append(RankRow(count_in * elt, count_out, time_us, wrong))
            advance()
    return rows


def _check(ctx: RankContext, test, opts: BenchOptions, inp, out, count_in: int, count_out: int,
           call) -> int:
    inp.copy_(fill_value(ctx.rank, torch.arange(count_in)).to(inp.dtype))
    if not test.inplace:
        out.fill_(0)
    call("_check", host_sync=True)
    if ctx.device.type == "cuda":
        torch.cuda.current_stream(ctx.device).synchronize()
    if opts.corrupt_rank == ctx.rank:
        out[0] = out[0] + 1  # testing hook: a planted wrong element
    expected = test.expected(ctx.rank, ctx.world_size, opts.root, count_out)
    got = out.cpu().to(torch.float64)  # small integers: exact in float64
    return int((got != expected.to(torch.float64)).sum())


def combine(per_rank: list[list[RankRow]], op: str, nranks: int) -> list[dict]:
    """nccl-tests' reduction over ranks: max time, summed #wrong; adds algbw/busbw."""
    factor = Collective(op).bus_factor(nranks)
    rows = []
    for cells in zip(*per_rank):
        time_us = max(c.time_us for c in cells)
        wrong = sum(c.wrong for c in cells) if all(c.wrong >= 0 for c in cells) else -1
        size = cells[0].size
        algbw = size / (time_us * 1e-6) / 1e9 if time_us > 0 else 0.0
        rows.append({"size": size, "count": cells[0].count, "time_us": time_us,
                     "algbw_GBps": algbw, "busbw_GBps": algbw * factor, "wrong": wrong})
    return rows
