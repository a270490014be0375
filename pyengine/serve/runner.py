"""`pyengine serve` on every rank: the scheduling rank serves HTTP and schedules, the others follow.

    results = run_ranks(bind(serve_rank, opts), world, backend=..., ...)   # pyengine.execute.launch

The scheduling rank (opts.root) builds its step loop, a Session, the HTTP app on a thread, and
drives the session on a thread of its own: a step while anything is live, else an IDLE message
every opts.beat_s (so that the followers' waits and the launcher's progress watch stay fed). Every
other rank builds the same step loop and runs the root's plans until it says STOP.

Shutting down: when `opts.drain` is set (the serve command's SIGTERM), nothing new is admitted
(503), what was accepted runs on for up to opts.grace_s, then whatever is left is aborted; the
root sends STOP and every rank returns a ServeOutcome (aborted > 0: the grace was not enough).
When the engine fails under the server (a rank died), every in-flight request ends with 503 and
the root raises, so the launcher names the rank that caused it.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pyengine.serve.scheduler import Limits

BEAT_S = 1.0
"""An idle root sends the followers a message at least this often."""
JOIN_POLL_S = 0.1


@dataclass(frozen=True, slots=True)
class LoopSetup:
    """One rank's step loop and what the scheduler plans within."""

    loop: Any
    limits: Limits
    stop_ids: tuple[int, ...] = ()
    kv_blocks_used: Callable[[], int] | None = None


@dataclass(frozen=True, slots=True)
class ServeOptions:
    make_loop: Callable[[Any], LoopSetup]
    """make_loop(ctx) -> this rank's LoopSetup (picklable for the process backends)."""
    host: str
    port: int
    model: str
    """The name /v1/models lists and requests may give."""
    tokenizer_dir: str | None
    grace_s: float
    timeout_s: float
    drain: Any
    """An Event (multiprocessing's, so spawned ranks see it): set to start shutting down."""
    root: int = 0
    beat_s: float = BEAT_S
    on_started: Callable[[Any], None] | None = None
    """Same-process backends only: called with the Running server once it listens."""


@dataclass(frozen=True, slots=True)
class ServeOutcome:
    rank: int
    steps: int
    aborted: int = 0
    """Requests still running when the grace ran out (the serve command exits 143 then)."""
    port: int | None = None


@dataclass(slots=True)
class Running:
    """The root's live server: what a same-process caller may fail or stop."""

    frontend: Any
    http: Any


def serve_rank(ctx, opts: ServeOptions) -> ServeOutcome:
    from pyengine.serve.channel import PlanChannel
    from pyengine.serve.session import Session

    try:
        setup = opts.make_loop(ctx)
        channel = PlanChannel(ctx.transport, opts.root, ctx.world_size, opts.timeout_s)
        if ctx.rank != opts.root:
            session = Session(setup.loop, setup.limits, channel=channel, on_action=ctx.on_action)
            session.follow()
            return ServeOutcome(ctx.rank, session.steps)
        return _serve_root(ctx, opts, setup, channel)
    except BaseException:
        # fail the peers' pending waits on this rank now, not at their timeout: rank 0 then answers
        # its in-flight requests with 503 at once; the rank's own error is what the launcher reports
        with contextlib.suppress(Exception):
            ctx.transport.abort()
        raise


def _serve_root(ctx, opts: ServeOptions, setup: LoopSetup, channel) -> ServeOutcome:
    from pyengine.serve.app import Frontend
    from pyengine.serve.http_thread import HttpThread
    from pyengine.serve.metrics import ServeMetrics
    from pyengine.serve.session import Session
    from pyengine.serve.text import TextCodec

    session = Session(setup.loop, setup.limits, channel=channel, stop_ids=setup.stop_ids, background=True,
                      on_action=ctx.on_action)
    session.observer = ServeMetrics(session, setup.kv_blocks_used)
    frontend = Frontend(session, TextCodec.for_folder(opts.tokenizer_dir), model=opts.model,
                        metrics=session.observer, max_model_len=setup.limits.capacity or setup.limits.max_positions,
                        device=str(ctx.device))
    http = HttpThread(frontend.app(), opts.host, opts.port)
    port = http.start()
    print(f"pyengine serve: listening on http://{opts.host}:{port} (model {opts.model!r})", flush=True)
    if opts.on_started is not None:
        opts.on_started(Running(frontend, http))
    result: dict = {}
    driver = threading.Thread(target=_drive_safely, args=(session, opts, result), name="pyengine-serve-engine",
                              daemon=True)
    with _stop_on_sigterm(frontend) as stopped:
        driver.start()
        while driver.is_alive() and not stopped.is_set():
            driver.join(JOIN_POLL_S)  # the main thread stays free for signals
    error = result.get("error")
    if error is not None or stopped.is_set():
        why = (f"the engine failed: {type(error).__name__}: {error}" if error is not None
               else "the server was stopped")
        frontend.fail(why)
        http.stop()
        if error is not None:
            raise error
        sys.exit(128 + signal.SIGTERM)
    http.stop()
    return ServeOutcome(ctx.rank, session.steps, result.get("aborted", 0), port)


def _drive_safely(session, opts: ServeOptions, result: dict) -> None:
    try:
        result["aborted"] = drive(session, opts.drain, opts.grace_s, opts.beat_s)
    except BaseException as e:  # handed to the rank's own thread, which fails the requests and raises
        result["error"] = e


def drive(session, drain, grace_s: float, beat_s: float = BEAT_S) -> int:
    """Step the root's session until `drain` is set and what runs has ended (or the grace ran
    out); returns how many requests were aborted at the end of the grace."""
    deadline = None
    aborted = 0
    while True:
        if deadline is None and drain.is_set():
            session.stop_admitting("the server is shutting down: no new requests are admitted")
            deadline = time.monotonic() + grace_s
        if deadline is not None and not session.has_work():
            break
        if deadline is not None and time.monotonic() > deadline:
            aborted = len(session.scheduler.running) + len(session.scheduler.waiting)
            session.abort_all("the server shut down before the request finished (its grace period ran out)")
            session.step()  # their slots go back with one last plan
            break
        if session.has_work() or not session.wait_for_work(beat_s):
            session.step()  # a step, or an IDLE beat after beat_s with nothing to do
    session.close()
    return aborted


class _stop_on_sigterm:
    """In a rank process's main thread (the process backends), SIGTERM from the launcher (a peer
    died) fails the in-flight requests with 503 before the process goes; elsewhere a no-op."""

    def __init__(self, frontend):
        self.frontend, self.stopped = frontend, threading.Event()
        self.previous = None

    def __enter__(self) -> threading.Event:
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        return self.stopped

    def _handle(self, signum, frame) -> None:
        self.stopped.set()

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
