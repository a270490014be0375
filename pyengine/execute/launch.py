"""One launcher for everything that runs on ranks (`pyengine run`, `pyengine bench comm`).

    results = run_ranks(body, world_size, backend=pick_backend(world_size), groups=..., timeout_s=...)

`body(ctx)` runs once per rank with a connected transport; `run_ranks` returns the bodies'
results ordered by rank (under torchrun: on global rank 0, None on the others). Backends:
- under torchrun (RANK/WORLD_SIZE set): this process is one rank; results travel to rank 0
  through the transport itself (the rendezvous store caps messages at a few MB);
- nccl / gloo: one process per rank spawned here (pyengine.execute.procs), a GPU each for nccl;
- local: one thread per virtual rank in this process, on one device (GPU or CPU).
A rank that dies or stalls ends the whole job with a LaunchError naming that rank and the action
it was in, not the peer that noticed: every rank keeps its liveness and last action on a board
(pyengine.execute.liveness) that pyengine.execute.blame reads when a failure surfaces.
"""

from __future__ import annotations

import functools
import os
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from pyengine.core.errors import UsageError
from pyengine.execute.backends import BACKEND_CHOICES, Backend

T = TypeVar("T")


class LaunchError(RuntimeError):
    """The job could not run to the end; the message names the failing rank and action."""


def _no_action(action: str, waiting: bool) -> None:
    return None


@dataclass(slots=True)
class RankContext:
    """What a rank's body gets: its rank, its transport and device, a barrier over all ranks,
    and `on_action(action_id, waiting)` to report progress (RankRuntime's hook; bodies that run
    long outside the runtime call it too, so that a slow rank is not mistaken for a stalled one)."""

    rank: int
    world_size: int
    transport: Any
    device: torch.device
    barrier: Callable[[], None]
    on_action: Callable[[str, bool], None] = _no_action


@dataclass(frozen=True, slots=True)
class TorchrunEnv:
    rank: int
    world_size: int
    local_rank: int


def torchrun_env() -> TorchrunEnv | None:
    """This process's place under torchrun (RANK and WORLD_SIZE set), every variable checked
    (EnvError: exit 2); None when not under torchrun."""
    from pyengine.core.env import EnvError, env_int

    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = env_int("WORLD_SIZE", low=1)
    rank = env_int("RANK", high=world - 1)
    env_int("MASTER_PORT", low=1, high=65535)  # read when the ranks meet: refused here, first
    local = env_int("LOCAL_RANK", 0)
    if local > rank:
        raise EnvError("LOCAL_RANK", os.environ["LOCAL_RANK"], f"must be <= RANK ({rank})")
    return TorchrunEnv(rank, world, local)


def under_torchrun() -> bool:
    return torchrun_env() is not None


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
    GPU per rank (under torchrun: this process's LOCAL_RANK GPU). EnvError when torchrun's
    variables are bad, whatever the backend."""
    env = torchrun_env()
    if not backend.gpu_per_rank:
        return
    n = _gpus()
    need = env.local_rank + 1 if env is not None else world_size
    if n < need:
        seen = "no CUDA GPU is visible" if n == 0 else f"{n} CUDA GPU(s) are visible"
        which = (f"rank {env.rank} uses GPU {env.local_rank} (LOCAL_RANK)" if env is not None
                 else str(need))
        raise UsageError("--backend", "nccl", f"needs one CUDA GPU per rank ({which}); {seen} here "
                                              "(use --backend gloo or local)")


def run_ranks(body: Callable[[RankContext], T], world_size: int, *, backend: Backend,
              groups: Sequence[Sequence[int]], timeout_s: float, job_timeout_s: float,
              env: dict[str, str] | None = None) -> list[T] | None:
    """Run `body` on every rank (see the module docstring). `groups`: every collective group
    the bodies use, identical on all ranks; `timeout_s` bounds each wait; the job fails when no
    rank has made progress for `job_timeout_s` (so a long healthy run is never cut short).
    For the process backends `body` must pickle (a module-level function or a partial of one)."""
    if backend.process_per_rank and under_torchrun():
        return _torchrun_rank(body, world_size, backend, groups, timeout_s)
    if not backend.process_per_rank:
        from pyengine.execute.threads import ThreadFailure, run_threads

        try:
            return run_threads(body, world_size, timeout_s, job_timeout_s, RankContext)
        except ThreadFailure as e:
            raise LaunchError(str(e).splitlines()[0]) from None
    return _spawn(body, world_size, backend, groups, timeout_s, job_timeout_s, env)


def _spawn(body: Callable, world: int, backend: Backend, groups, timeout_s: float,
           idle_s: float, env: dict[str, str] | None) -> list:
    """nccl / gloo: a process per rank; the parent hosts the store (it outlives any rank) and
    the liveness board the ranks write and the parent reads."""
    import multiprocessing as mp

    from pyengine.execute.blame import BoardWatch
    from pyengine.execute.liveness import Board
    from pyengine.execute.procs import RankFailure, spawn_ranks
    from pyengine.transport.store import host_store

    board = Board.for_processes(world, mp.get_context("spawn"))
    store = host_store(world, timeout_s)
    extra = {} if backend.on_gpu() else {"OMP_NUM_THREADS": "1"}  # CPU ranks share the cores
    quiet = {"TORCH_CPP_LOG_LEVEL": os.environ.get("TORCH_CPP_LOG_LEVEL", "FATAL")}  # c10d's own
    # error lines repeat, with C++ frames, what the one-line error below says
    try:
        return spawn_ranks(_process_rank, world, args=(body, backend, tuple(map(tuple, groups)),
                                                        timeout_s, board),
                           timeout_s=None, port=store.port, watch=BoardWatch(board, idle_s, timeout_s),
                           env={"TORCHELASTIC_USE_AGENT_STORE": "True", **quiet, **extra, **(env or {})})
    except RankFailure as e:
        raise LaunchError(str(e).splitlines()[0]) from None  # the child's traceback tail is noise here


def _device(backend: Backend, rank: int) -> torch.device:
    if not backend.on_gpu():
        return torch.device("cpu")
    env = torchrun_env()
    local = env.local_rank if env is not None else rank
    torch.cuda.set_device(local)
    return torch.device("cuda", local)


def _connect(backend: Backend, rank: int, world: int, store: Any, groups, timeout_s: float):
    from pyengine.transport import create_transport

    return create_transport(backend.value, rank=rank, world_size=world, device=_device(backend, rank),
                            groups=groups, store=store, timeout_s=timeout_s)


def _process_rank(rank: int, world: int, port: int, body: Callable, backend: Backend, groups,
                  timeout_s: float, board: Any) -> Any:
    """One rank in its own process spawned here, its record kept on the parent's board."""
    from pyengine.execute.liveness import Beacon
    from pyengine.transport.store import STARTUP_TIMEOUT_S, connect_store, wait_for_ranks

    if not backend.on_gpu():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    with Beacon(board, rank, heartbeat=True) as beacon:
        with beacon.waiting("store and peers"):  # waiting, so never "stalled" in start-up
            startup_s = max(timeout_s, STARTUP_TIMEOUT_S)
            store = connect_store(rank, world, port, host=os.environ.get("MASTER_ADDR", "127.0.0.1"),
                                  timeout_s=startup_s)
            wait_for_ranks(store, rank, world, startup_s)
            transport = _connect(backend, rank, world, store, groups, timeout_s)
        with transport as tr:
            def barrier() -> None:
                with beacon.waiting("barrier"):
                    tr.barrier()

            return body(RankContext(rank, world, tr, tr.device, barrier, beacon.on_action))


def _torchrun_rank(body: Callable, world_size: int, backend: Backend, groups, timeout_s: float):
    """This process is one rank started by torchrun; the results meet on rank 0."""
    from pyengine.transport.store import STARTUP_TIMEOUT_S, store_from_env

    env = torchrun_env()
    rank, world = env.rank, env.world_size
    if world < world_size:
        raise LaunchError(f"torchrun started {world} ranks; the job needs {world_size}")
    try:
        store = store_from_env(rank, world, max(timeout_s, STARTUP_TIMEOUT_S))
        with _connect(backend, rank, world, store, groups, timeout_s) as tr:
            result = body(RankContext(rank, world, tr, tr.device, tr.barrier))
            return gather_to_rank0(tr, result, timeout_s)
    except Exception as e:  # one line per rank; torchrun's summary names the rank that died
        from pyengine.execute.liveness import waited_on_peer

        what = "stopped waiting on a peer" if waited_on_peer(e) else "failed"
        first = (str(e).strip().splitlines() or [""])[0]
        raise LaunchError(f"rank {rank} {what}: {type(e).__name__}: {first}") from None


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


def bind(fn: Callable[..., T], *args: Any) -> Callable[[RankContext], T]:
    """body(ctx) = fn(ctx, *args), picklable when fn is a module-level function."""
    return functools.partial(_call_with_ctx, fn, args)


def _call_with_ctx(fn: Callable[..., T], args: tuple, ctx: RankContext) -> T:
    return fn(ctx, *args)
