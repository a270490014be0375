"""Local multi-process launcher shared by the comm harness and the pipeline launcher.

``spawn_ranks(fn, nranks, *, args=(), timeout_s, env=None, port=None, watch=None) -> list``

* Uses the multiprocessing ``spawn`` context (no forked CUDA/NCCL state).
* Rank ``r`` runs ``fn(r, nranks, master_port, *args)``; ``fn`` and ``args`` must be
  picklable (a module-level function). ``master_port`` is ``port``, or a free TCP port on
  127.0.0.1 chosen by the parent; unless told otherwise (TORCHELASTIC_USE_AGENT_STORE=True in
  ``env``: the caller hosts it), rank 0 hosts the rendezvous store there
  (pyengine.transport.store.connect_store). Each child also gets ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
  ``MASTER_PORT`` in its environment, plus ``env`` (in place when its interpreter starts).
* Returns the per-rank return values, ordered by rank. They travel pickled by value
  (torch tensors included), so they outlive the rank that produced them.
* The parent watches every child. If a rank raises, exits non-zero, is killed
  by a signal, exits without reporting, or the whole job exceeds ``timeout_s`` (None: no
  bound of its own, the watch's ``stalled`` decides), all other ranks are terminated
  (SIGTERM, then SIGKILL after a grace period) and :class:`RankFailure` is raised naming the
  rank and what happened. Before stopping anything, the parent notes which ranks had already
  died or were stopped (SIGSTOP) and asks ``watch`` (or, without one, prefers a dead rank
  over a peer that noticed it) who caused the failure. Children also get SIGKILL if the parent
  dies (Linux ``PR_SET_PDEATHSIG``), so no orphan outlives the job; an exception in the parent
  (Ctrl-C, SIGTERM turned into one) stops every child before it propagates.
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Protocol

from pyengine.core.stop_signal import raise_if_stopped

__all__ = ["RankFailure", "Watch", "spawn_ranks", "free_port"]

_TRACEBACK_TAIL_LINES = 25
_TERM_GRACE_S = 3.0
_REPORT_GRACE_S = 1.0  # how long a rank that exited 0 may take to deliver its result
SETTLE_S = 4.0
"""After a failure, how long the parent may watch for its true cause to show (a death seen a
moment late, a stopped rank's silence) before it stops the job."""


class RankFailure(RuntimeError):
    """A rank of a :func:`spawn_ranks` job failed; ``rank`` and ``reason`` say which and how."""

    def __init__(self, rank: int | None, reason: str, headline: str | None = None):
        self.rank = rank
        self.reason = reason
        who = f"rank {rank}" if rank is not None else "job"
        super().__init__(headline or f"{who} failed: {reason}")


class Watch(Protocol):
    """The caller's knowledge of its ranks (pyengine.execute.launch: the liveness board)."""

    def stalled(self) -> str | None:
        """Polled while the job runs: a reason to fail it now (no rank progressed for long)."""

    def blame(self, failure: RankFailure, dead: Mapping[int, str], frozen: set[int],
              final: bool) -> RankFailure | None:
        """The failure naming the true cause of `failure` (perhaps `failure` itself), or None
        to be asked again shortly (`final`: answer now)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual bind-to-0 trick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent(rank: int) -> None:
    """SIGKILL when the parent dies; the name `pyengine-rankN` in ps/top//proc/PID/comm, so that
    a user (or a test) can tell the ranks apart; and a process group of its own, so that a signal
    sent to the job's group (Ctrl-C in a terminal, `kill -- -PGID`, a service manager's stop)
    reaches the parent alone, which decides what it means (`pyengine serve` drains) and stops the
    ranks itself, instead of every rank dying at once and the parent blaming the first it sees."""
    os.setpgid(0, 0)
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        libc.prctl(15, f"pyengine-rank{rank}".encode()[:15])  # PR_SET_NAME
    except (OSError, AttributeError):
        pass  # best effort: the parent still terminates children on every exit path


def _rank_main(fn: Callable[..., Any], rank: int, nranks: int, port: int, args: Sequence[Any],
               env: Mapping[str, str], results: Any) -> None:
    _die_with_parent(rank)
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


def _frozen(pid: int | None) -> bool:
    """True when the process is stopped (SIGSTOP, a debugger): state T or t in /proc."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rpartition(")")[2].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _stop(procs: Sequence[Any]) -> None:
    procs = [p for p in procs if p.pid is not None]  # a start that failed leaves nothing to stop
    for p in procs:
        if p.is_alive():
            p.terminate()
            if _frozen(p.pid):
                os.kill(p.pid, signal.SIGCONT)  # a stopped process acts on SIGTERM only once resumed
    deadline = time.monotonic() + _TERM_GRACE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(_TERM_GRACE_S)


class _Job:
    """The parent's view of one spawn_ranks call: processes, results, deaths seen, deadline."""

    def __init__(self, fn: Callable[..., Any], nranks: int, args: Sequence[Any], port: int,
                 env: Mapping[str, str] | None, timeout_s: float | None, watch: Watch | None):
        self.nranks, self.timeout_s, self.watch = nranks, timeout_s, watch
        ctx = mp.get_context("spawn")
        self.queue = ctx.Queue()
        self.envs = [_child_env(rank, nranks, port, env) for rank in range(nranks)]
        self.procs = [ctx.Process(target=_rank_main, name=f"pyengine-rank{rank}",
                                  args=(fn, rank, nranks, port, tuple(args), self.envs[rank],
                                        self.queue))
                      for rank in range(nranks)]
        self.results: dict[int, Any] = {}
        self.exited_at: dict[int, float] = {}
        self.deadline = None if timeout_s is None else time.monotonic() + timeout_s

    def run(self) -> list[Any]:
        try:
            for p, env in zip(self.procs, self.envs):
                with _environ(env):  # in place before the child's interpreter (and torch) starts
                    p.start()
            failure = self._wait_all()
            if failure is not None:
                failure = self._settle(failure)
        finally:  # every path (a failure, Ctrl-C, SIGTERM raised in the parent) stops the children
            self._finish()
        if failure is not None:
            raise failure
        return [self.results[r] for r in range(self.nranks)]

    def _wait_all(self) -> RankFailure | None:
        while len(self.results) < self.nranks:
            failure = self._receive() or self._check_exits() or self._check_time()
            if failure is not None:
                return failure
            raise_if_stopped()
        return None

    def _receive(self) -> RankFailure | None:
        try:
            rank, ok, value = self.queue.get(timeout=0.05)
        except queue.Empty:
            return None
        if not ok:
            return RankFailure(rank, f"raised {value}")
        self.results[rank] = pickle.loads(value)
        return None

    def _check_exits(self) -> RankFailure | None:
        now = time.monotonic()
        for rank, p in enumerate(self.procs):
            if rank in self.results or p.exitcode is None:
                continue
            if p.exitcode != 0:  # an error report may still be in the queue: prefer its text
                return self._drain_failure() or RankFailure(rank, _exit_reason(p.exitcode))
            if now - self.exited_at.setdefault(rank, now) > _REPORT_GRACE_S:
                return RankFailure(rank, _exit_reason(0))
        return None

    def _check_time(self) -> RankFailure | None:
        stalled = self.watch.stalled() if self.watch is not None else None
        if stalled is not None:
            return RankFailure(None, stalled)
        if self.deadline is not None and time.monotonic() > self.deadline:
            pending = [r for r in range(self.nranks) if r not in self.results]
            return RankFailure(pending[0] if len(pending) == 1 else None,
                               f"timed out after {self.timeout_s:g} s; ranks still running: {pending}")
        return None

    def _drain_failure(self) -> RankFailure | None:
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            failure = self._receive()
            if failure is not None:
                return failure
        return None

    def _settle(self, failure: RankFailure) -> RankFailure:
        """Name the true cause: look (up to SETTLE_S) for ranks that died or were stopped before
        anything was stopped here; the watch weighs them against the rank that reported."""
        deadline = time.monotonic() + (SETTLE_S if self.watch is not None else 1.0)
        while True:
            dead = self._dead()
            frozen = {r for r, p in enumerate(self.procs) if p.exitcode is None and _frozen(p.pid)}
            final = time.monotonic() >= deadline
            blame = self.watch.blame if self.watch is not None else _dead_peer
            cause = blame(failure, dead, frozen, final)
            if cause is not None:
                return cause
            time.sleep(0.05)

    def _dead(self) -> dict[int, str]:
        """Ranks that ended abnormally (nothing has been stopped yet): rank -> how."""
        return {r: _exit_reason(p.exitcode) for r, p in enumerate(self.procs)
                if r not in self.results and p.exitcode not in (None, 0)}

    def _finish(self) -> None:
        if len(self.results) == self.nranks:
            for p in self.procs:
                p.join(_TERM_GRACE_S)
        _stop(self.procs)
        self.queue.close()
        self.queue.cancel_join_thread()


@contextlib.contextmanager
def _environ(env: Mapping[str, str]) -> Iterator[None]:
    """os.environ with `env` applied, restored after: a spawned child inherits it at exec, so
    settings read once at library load (TORCH_CPP_LOG_LEVEL, OMP_NUM_THREADS) take effect."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _child_env(rank: int, nranks: int, port: int, env: Mapping[str, str] | None) -> dict[str, str]:
    return {"RANK": str(rank), "WORLD_SIZE": str(nranks), "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(nranks), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "TORCHELASTIC_USE_AGENT_STORE": "False", **(env or {})}


def _dead_peer(failure: RankFailure, dead: Mapping[int, str], frozen: set[int],
               final: bool) -> RankFailure | None:
    """Without a watch: a rank that died beats a peer that raised because of it."""
    if failure.rank is not None and failure.reason.startswith("raised"):
        for rank, how in dead.items():
            if rank != failure.rank:
                first_line = failure.reason.splitlines()[0]
                return RankFailure(rank, f"{how}; then rank {failure.rank} {first_line}")
    return failure if final or dead else None


def spawn_ranks(fn: Callable[..., Any], nranks: int, *, args: Sequence[Any] = (),
                timeout_s: float | None, env: Mapping[str, str] | None = None,
                port: int | None = None, watch: Watch | None = None) -> list[Any]:
    """Run ``fn(rank, nranks, master_port, *args)`` in ``nranks`` spawned processes; see the
    module docstring for the contract. Raises RankFailure on the first failure or timeout."""
    if nranks < 1:
        raise ValueError(f"spawn_ranks: nranks must be >= 1, got {nranks}")
    if timeout_s is not None and not timeout_s > 0:
        raise ValueError(f"spawn_ranks: timeout_s must be > 0, got {timeout_s}")
    if timeout_s is None and watch is None:
        raise ValueError("spawn_ranks: without a watch, timeout_s must bound the job")
    return _Job(fn, nranks, args, port or free_port(), env, timeout_s, watch).run()
