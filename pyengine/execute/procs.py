"""Local multi-process launcher shared by the comm harness and the pipeline launcher.

``spawn_ranks(fn, nranks, *, args=(), timeout_s, env=None) -> list``

* Uses the multiprocessing ``spawn`` context (no forked CUDA/NCCL state).
* Rank ``r`` runs ``fn(r, nranks, master_port, *args)``; ``fn`` and ``args`` must be
  picklable (a module-level function). ``master_port`` is a free TCP port on
  127.0.0.1 chosen by the parent; rank 0 is expected to host the rendezvous
  store there (pyengine.transport.store.connect_store). Each child also gets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
  ``MASTER_PORT`` in its environment, plus ``env`` (applied before ``fn`` runs).
* Returns the per-rank return values, ordered by rank. They travel pickled by value
  (torch tensors included), so they outlive the rank that produced them.
* The parent watches every child. If a rank raises, exits non-zero, is killed
  by a signal, exits without reporting, or the whole job exceeds ``timeout_s``,
  all other ranks are terminated (SIGTERM, then SIGKILL after a grace period)
  and :class:`RankFailure` is raised naming the rank and what happened (the
  exception with its traceback tail, the exit code, the signal, or the timeout
  and the ranks still running). Children also get SIGKILL if the parent dies
  (Linux ``PR_SET_PDEATHSIG``), so no orphan outlives the job.
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["RankFailure", "spawn_ranks", "free_port"]

_TRACEBACK_TAIL_LINES = 25
_TERM_GRACE_S = 3.0
_REPORT_GRACE_S = 1.0  # how long a rank that exited 0 may take to deliver its result


class RankFailure(RuntimeError):
    """A rank of a :func:`spawn_ranks` job failed; ``rank`` and ``reason`` say which and how."""

    def __init__(self, rank: int | None, reason: str):
        self.rank = rank
        self.reason = reason
        who = f"rank {rank}" if rank is not None else "job"
        super().__init__(f"{who} failed: {reason}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # best effort: the parent still terminates children on every exit path


def _rank_main(fn: Callable[..., Any], rank: int, nranks: int, port: int, args: Sequence[Any],
               env: Mapping[str, str], results: Any) -> None:
    _die_with_parent()
    os.environ.update(env)
    try:
        # Plain pickle (by value): the queue's ForkingPickler would ship torch tensors as
        # shared-memory handles that die with this process.
        payload = pickle.dumps(fn(rank, nranks, port, *args))
    except BaseException as exc:  # reported to the parent, then this rank exits non-zero
        text = "".join(traceback.format_exception(exc))
        tail = "\n".join(text.rstrip().splitlines()[-_TRACEBACK_TAIL_LINES:])
        results.put((rank, False, f"{type(exc).__name__}: {exc}\n{tail}"))
        results.close()
        results.join_thread()
        sys.exit(1)
    results.put((rank, True, payload))
    results.close()
    results.join_thread()


def _exit_reason(exitcode: int) -> str:
    if exitcode < 0:
        try:
            return f"killed by signal {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode} without reporting a result"


def _stop(procs: Sequence[Any]) -> None:
    procs = [p for p in procs if p.pid is not None]  # a start that failed leaves nothing to stop
    for p in procs:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + _TERM_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(_TERM_GRACE_S)


def spawn_ranks(fn: Callable[..., Any], nranks: int, *, args: Sequence[Any] = (),
                timeout_s: float, env: Mapping[str, str] | None = None) -> list[Any]:
    """Run ``fn(rank, nranks, master_port, *args)`` in ``nranks`` spawned processes; see the
    module docstring for the contract. Raises RankFailure on the first failure or timeout."""
    if nranks < 1:
        raise ValueError(f"spawn_ranks: nranks must be >= 1, got {nranks}")
    if timeout_s <= 0:
        raise ValueError(f"spawn_ranks: timeout_s must be > 0, got {timeout_s}")
    ctx = mp.get_context("spawn")
    port = free_port()
    results_q = ctx.Queue()
    procs = []
    for rank in range(nranks):
        child_env = {"RANK": str(rank), "WORLD_SIZE": str(nranks), "LOCAL_RANK": str(rank),
                     "LOCAL_WORLD_SIZE": str(nranks), "MASTER_ADDR": "127.0.0.1",
                     "MASTER_PORT": str(port), "TORCHELASTIC_USE_AGENT_STORE": "False",
                     **(env or {})}
        procs.append(ctx.Process(target=_rank_main, name=f"pyengine-rank{rank}",
                                 args=(fn, rank, nranks, port, tuple(args), child_env, results_q)))
    results: dict[int, Any] = {}
    exited_at: dict[int, float] = {}
    failure: RankFailure | None = None
    deadline = time.monotonic() + timeout_s
    try:
        for p in procs:
            p.start()
        while len(results) < nranks:
            try:
                rank, ok, value = results_q.get(timeout=0.05)
            except queue.Empty:
                pass
            else:
                if not ok:
                    failure = RankFailure(rank, f"raised {value}")
                    break
                results[rank] = pickle.loads(value)
                continue
            now = time.monotonic()
            for rank, p in enumerate(procs):
                if rank in results or p.exitcode is None:
                    continue
                if p.exitcode != 0:
                    # An error report may still be in the queue: prefer its text.
                    failure = _drain_failure(results_q, results) or RankFailure(
                        rank, _exit_reason(p.exitcode))
                    break
                first = exited_at.setdefault(rank, now)
                if now - first > _REPORT_GRACE_S:
                    failure = RankFailure(rank, _exit_reason(0))
                    break
            if failure is not None:
                break
            if now > deadline:
                pending = [r for r in range(nranks) if r not in results]
                failure = RankFailure(pending[0] if len(pending) == 1 else None,
                                      f"timed out after {timeout_s:g} s; ranks still running: {pending}")
                break
    finally:
        if failure is not None or len(results) < nranks:
            _stop(procs)
        else:
            for p in procs:
                p.join(_TERM_GRACE_S)
            _stop(procs)
        results_q.close()
        results_q.cancel_join_thread()
    if failure is not None:
        raise _root_cause(failure, procs, results)
    return [results[r] for r in range(nranks)]


def _root_cause(failure: RankFailure, procs: Sequence[Any], results: dict[int, Any]) -> RankFailure:
    """When a rank raised because a peer vanished (connection closed, timeout), the peer that
    died without reporting is the one to name. Called after all ranks have been stopped."""
    if failure.rank is None or not failure.reason.startswith("raised"):
        return failure
    for rank, p in enumerate(procs):
        if rank in (failure.rank, *results) or p.exitcode in (None, 0):
            continue
        if p.exitcode < 0 and -p.exitcode in (signal.SIGTERM, signal.SIGKILL):
            continue  # stopped by us after the failure, not the cause
        first_line = failure.reason.splitlines()[0]
        return RankFailure(rank, f"{_exit_reason(p.exitcode)}; then rank {failure.rank} {first_line}")
    return failure


def _drain_failure(results_q: Any, results: dict[int, Any]) -> RankFailure | None:
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        try:
            rank, ok, value = results_q.get(timeout=0.05)
        except queue.Empty:
            continue
        if not ok:
            return RankFailure(rank, f"raised {value}")
        results[rank] = pickle.loads(value)
    return None
