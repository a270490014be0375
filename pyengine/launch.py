"""Starts the ranks of a run on the best backend and gathers what each measured.

- under torchrun (RANK/WORLD_SIZE in the environment): this process is one rank, nccl;
- plain `pyengine run`: >= world-size GPUs -> nccl ranks spawned here; 1 GPU -> the local
  transport (one thread per virtual rank, one stream set each); no GPU -> gloo, one CPU
  process per rank.
A rank that dies or stalls ends the whole job with an error naming the rank and action.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

import torch

from pyengine import measure
from pyengine.spec import DeploymentSpec

BACKENDS = ("auto", "nccl", "local", "gloo")


class LaunchError(RuntimeError):
    """The job could not run to the end; the message names the failing rank and action."""


@dataclass(frozen=True, slots=True)
class RunOptions:
    iters: int = 10
    warmup: int = 2
    seed: int = 0
    baselines: bool = True
    profile: bool = False
    fault: str = ""
    """Testing hook: 'RANK:ACTION_ID:exit|hang' kills or stalls that rank at that action."""


def pick_backend(spec: DeploymentSpec, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend = {backend!r}: must be one of {list(BACKENDS)}")
    if backend != "auto":
        return backend
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "nccl"
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n >= spec.world_size:
        return "nccl"
    return "local" if n >= 1 else "gloo"


def launch(spec: DeploymentSpec, opts: RunOptions, backend: str = "auto") -> list[dict] | None:
    """Runs every rank; returns each rank's measurement dict, ordered by rank (under torchrun:
    on global rank 0 only, None on the others)."""
    backend = pick_backend(spec, backend)
    job_timeout = spec.comm.timeout_s * 4 + 120  # generous: covers start-up and all variants
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and backend != "local":
        return _torchrun_rank(spec, opts, backend)  # this process is one rank of torchrun's
    if backend == "gloo":
        from pyengine.procs import RankFailure, spawn_ranks

        try:
            return spawn_ranks(_process_rank, spec.world_size, args=(spec.to_json(), opts, "gloo"),
                               timeout_s=job_timeout, env={"OMP_NUM_THREADS": "1"})
        except RankFailure as e:
            raise LaunchError(_headline(e)) from None
    if backend == "local":
        return _run_threads(spec, opts, job_timeout)
    from pyengine.procs import RankFailure, spawn_ranks

    try:
        return spawn_ranks(_process_rank, spec.world_size, args=(spec.to_json(), opts, "nccl"),
                           timeout_s=job_timeout)
    except RankFailure as e:
        raise LaunchError(_headline(e)) from None


def _headline(e: BaseException) -> str:
    """The failure's first line: rank, action and cause (the child's traceback tail is noise here)."""
    return str(e).splitlines()[0]


def _torchrun_rank(spec: DeploymentSpec, opts: RunOptions, backend: str) -> list[dict] | None:
    """This process is one rank started by torchrun; results meet on rank 0 through the store."""
    import datetime
    import pickle

    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if world < spec.world_size:
        raise LaunchError(f"torchrun started {world} ranks; the spec needs {spec.world_size}")
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # torchrun's agent already hosts a store at MASTER_PORT when it says so: connect as a client.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.PrefixStore("pyengine", dist.TCPStore(
        host, port, world, rank == 0 and not agent,
        timeout=datetime.timedelta(seconds=spec.comm.timeout_s), wait_for_workers=False))
    result = _rank_body(rank, world, store, spec, opts, backend)
    store.set(f"result/{rank}", pickle.dumps(result))
    if rank != 0:
        return None
    return [pickle.loads(store.get(f"result/{r}")) for r in range(world)]


def _process_rank(rank: int, world: int, port: int, spec_json: str, opts: RunOptions,
                  backend: str) -> dict:
    """One rank in its own process spawned here (gloo on CPU, or nccl with one GPU per process)."""
    from pyengine.procs import connect_store

    spec = DeploymentSpec.from_json(spec_json)
    store = connect_store(rank, world, port, host=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                          timeout_s=spec.comm.timeout_s)
    return _rank_body(rank, world, store, spec, opts, backend)


def _rank_body(rank: int, world: int, store, spec: DeploymentSpec, opts: RunOptions,
               backend: str) -> dict:
    from pyengine.transport import create_transport

    if backend == "gloo":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
    else:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    groups = [tuple(range(world)), spec.stage("experts").gpus]
    with create_transport(backend, rank=rank, world_size=world, device=device, groups=groups,
                          store=store, timeout_s=spec.comm.timeout_s) as tr:
        return measure.measure_rank(spec, rank, tr, device, opts, barrier=tr.barrier)


def _run_threads(spec: DeploymentSpec, opts: RunOptions, timeout_s: float) -> list[dict]:
    """The local transport: all virtual ranks in this process, one thread (and stream set) each."""
    from pyengine.transport.local import LocalTransport

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")
    world = spec.world_size
    transports = LocalTransport.create(world, device, spec.comm.timeout_s)
    barrier = threading.Barrier(world, timeout=spec.comm.timeout_s)
    results: list = [None] * world
    errors: dict[int, BaseException] = {}

    def body(r: int) -> None:
        try:
            results[r] = measure.measure_rank(spec, r, transports[r], device, opts, barrier=barrier.wait)
        except BaseException as e:  # reported below with the rank named
            errors[r] = e
            barrier.abort()  # release peers blocked in a barrier

    threads = [threading.Thread(target=body, args=(r,), name=f"pyengine-vrank{r}", daemon=True)
               for r in range(world)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout_s
    for r, t in enumerate(threads):
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [r for r, t in enumerate(threads) if t.is_alive()]
    for t in transports:
        t.close()
    if errors:
        first = _root_cause(errors)
        raise LaunchError(f"rank {first} failed: {errors[first]}")
    if stuck:
        raise LaunchError(f"ranks {stuck} still running after {timeout_s:g} s (stalled)")
    return results


def _root_cause(errors: dict[int, BaseException]) -> int:
    """The rank whose failure came first in spirit: a real error beats peers' barrier/timeouts."""
    for r, e in sorted(errors.items()):
        if not isinstance(e, threading.BrokenBarrierError) and "timed out" not in str(e):
            return r
    return min(errors)
