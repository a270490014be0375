"""One launcher for everything that runs on ranks (`pyengine run`, `pyengine bench comm`).

    results = run_ranks(body, world_size, backend=pick_backend(world_size), groups=..., timeout_s=...)

`body(ctx)` runs once per rank with a connected transport; `run_ranks` returns the bodies'
results ordered by rank (under torchrun: on global rank 0, None on the others). Backends:
- under torchrun (RANK/WORLD_SIZE set): this process is one rank; results travel to rank 0
  through the transport itself (the rendezvous store caps messages at a few MB);
- nccl / gloo: one process per rank spawned here (pyengine.execute.procs), a GPU each for nccl;
- local: one thread per virtual rank in this process, on one device (GPU or CPU).
A rank that dies or stalls ends the whole job with a LaunchError naming the rank.
"""

from __future__ import annotations

import enum
import functools
import os
import pickle
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from pyengine.core.errors import UsageError

T = TypeVar("T")


class Backend(str, enum.Enum):
    NCCL = "nccl"
    GLOO = "gloo"
    LOCAL = "local"


BACKEND_CHOICES = ("auto", *(b.value for b in Backend))


class LaunchError(RuntimeError):
    """The job could not run to the end; the message names the failing rank and action."""


@dataclass(slots=True)
class RankContext:
    """What a rank's body gets: its rank, its transport and device, and a barrier over all ranks."""

    rank: int
    world_size: int
    transport: Any
    device: torch.device
    barrier: Callable[[], None]


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def pick_backend(world_size: int, requested: str = "auto") -> Backend:
    """auto: nccl under torchrun or with >= world_size GPUs, local with 1+ GPU, else gloo."""
    if requested not in BACKEND_CHOICES:
        raise ValueError(f"backend = {requested!r}: must be one of {list(BACKEND_CHOICES)}")
    if requested != "auto":
        return Backend(requested)
    n = _gpus()
    if under_torchrun():
        return Backend.NCCL if n >= 1 else Backend.GLOO
    if n >= world_size:
        return Backend.NCCL
    return Backend.LOCAL if n >= 1 else Backend.GLOO


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_backend(backend: Backend, world_size: int) -> None:
    """UsageError, before anything starts, when `backend` cannot run here: nccl needs a CUDA
    GPU per rank (under torchrun: this process's LOCAL_RANK GPU)."""
    if backend is not Backend.NCCL:
        return
    n = _gpus()
    need = int(os.environ.get("LOCAL_RANK", 0)) + 1 if under_torchrun() else world_size
    if n < need:
        seen = "no CUDA GPU is visible" if n == 0 else f"{n} CUDA GPU(s) are visible"
        raise UsageError("--backend", "nccl", f"needs one CUDA GPU per rank ({need}); {seen} here "
                                              "(use --backend gloo or local)")


def run_ranks(body: Callable[[RankContext], T], world_size: int, *, backend: Backend,
              groups: Sequence[Sequence[int]], timeout_s: float, job_timeout_s: float,
              env: dict[str, str] | None = None) -> list[T] | None:
    """Run `body` on every rank (see the module docstring). `groups`: every collective group
    the bodies use, identical on all ranks; `timeout_s` bounds each wait, `job_timeout_s` the job.
    For the process backends `body` must pickle (a module-level function or a partial of one)."""
    if backend is not Backend.LOCAL and under_torchrun():
        return _torchrun_rank(body, world_size, backend, groups, timeout_s)
    if backend is Backend.LOCAL:
        return _run_threads(body, world_size, timeout_s, job_timeout_s)
    from pyengine.execute.procs import RankFailure, spawn_ranks

    extra = {"OMP_NUM_THREADS": "1"} if backend is Backend.GLOO else {}
    try:
        return spawn_ranks(_process_rank, world_size, args=(body, backend, tuple(map(tuple, groups)),
                                                            timeout_s),
                           timeout_s=job_timeout_s, env={**extra, **(env or {})})
    except RankFailure as e:
        raise LaunchError(str(e).splitlines()[0]) from None  # the child's traceback tail is noise here


def _device(backend: Backend, rank: int) -> torch.device:
    if backend is Backend.GLOO:
        return torch.device("cpu")
    local = int(os.environ.get("LOCAL_RANK", rank))
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _connect(backend: Backend, rank: int, world: int, store: Any, groups, timeout_s: float):
    from pyengine.transport import create_transport

    return create_transport(backend.value, rank=rank, world_size=world, device=_device(backend, rank),
                            groups=groups, store=store, timeout_s=timeout_s)


def _process_rank(rank: int, world: int, port: int, body: Callable, backend: Backend, groups,
                  timeout_s: float) -> Any:
    """One rank in its own process spawned here."""
    from pyengine.transport.store import connect_store

    if backend is Backend.GLOO:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    store = connect_store(rank, world, port, host=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          timeout_s=timeout_s)
    with _connect(backend, rank, world, store, groups, timeout_s) as tr:
        return body(RankContext(rank, world, tr, tr.device, tr.barrier))


def _torchrun_rank(body: Callable, world_size: int, backend: Backend, groups, timeout_s: float):
    """This process is one rank started by torchrun; the results meet on rank 0."""
    from pyengine.transport.store import store_from_env

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world < world_size:
        raise LaunchError(f"torchrun started {world} ranks; the job needs {world_size}")
    store = store_from_env(rank, world, timeout_s)
    with _connect(backend, rank, world, store, groups, timeout_s) as tr:
        result = body(RankContext(rank, world, tr, tr.device, tr.barrier))
        return gather_to_rank0(tr, result, timeout_s)


def gather_to_rank0(transport: Any, obj: Any, timeout_s: float) -> list[Any] | None:
    """Every rank's `obj` on rank 0 (None elsewhere), pickled and sent through the transport:
    a size first, then the bytes, so results of any size travel (logits included)."""
    from pyengine.transport.base import complete

    dev = transport.device
    if transport.rank != 0:
        data = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8).to(dev)
        size = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
        complete([transport.send(size, 0, name="result.size")], timeout_s)
        complete([transport.send(data, 0, name="result.data")], timeout_s)
        return None
    out = [obj]
    for r in range(1, transport.world_size):
        size = torch.empty(1, dtype=torch.int64, device=dev)
        complete([transport.recv(size, r, name="result.size")], timeout_s)
        data = torch.empty(int(size.item()), dtype=torch.uint8, device=dev)
        complete([transport.recv(data, r, name="result.data")], timeout_s)
        out.append(pickle.loads(data.cpu().numpy().tobytes()))
    return out


def _run_threads(body: Callable, world: int, timeout_s: float, job_timeout_s: float) -> list:
    """The local transport: all virtual ranks in this process, one thread (and stream set) each."""
    from pyengine.transport.local import LocalTransport

    device = (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
              else torch.device("cpu"))
    transports = LocalTransport.create(world, device, timeout_s)
    barrier = threading.Barrier(world, timeout=timeout_s)
    results: list = [None] * world
    errors: dict[int, BaseException] = {}

    def run(r: int) -> None:
        try:
            if device.type == "cuda":
                torch.cuda.set_device(device)
            results[r] = body(RankContext(r, world, transports[r], device, barrier.wait))
        except BaseException as e:  # reported below with the rank named
            errors[r] = e
            barrier.abort()  # release peers blocked in a barrier

    threads = [threading.Thread(target=run, args=(r,), name=f"pyengine-vrank{r}", daemon=True)
               for r in range(world)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + job_timeout_s
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    for t in transports:
        t.close()
    if errors:
        first = _root_cause(errors)
        raise LaunchError(f"rank {first} failed: {errors[first]}")
    if stuck:
        raise LaunchError(f"ranks {stuck} still running after {job_timeout_s:g} s (stalled)")
    return results


def _root_cause(errors: dict[int, BaseException]) -> int:
    """The rank whose failure came first in spirit: a real error beats peers' barrier/timeouts."""
    for r, e in sorted(errors.items()):
        if not isinstance(e, threading.BrokenBarrierError) and "timed out" not in str(e):
            return r
    return min(errors)


def bind(fn: Callable[..., T], *args: Any) -> Callable[[RankContext], T]:
    """body(ctx) = fn(ctx, *args), picklable when fn is a module-level function."""
    return functools.partial(_call_with_ctx, fn, args)


def _call_with_ctx(fn: Callable[..., T], args: tuple, ctx: RankContext) -> T:
    return fn(ctx, *args)
