"""A request's life on the scheduling rank, and the handle its submitter holds.

    handle = session.submit(prompt_ids, SamplingParams(max_new_tokens=8))
    for token in handle:           # new ids as the steps make them
        ...
    handle.result()                # every new id, once the request has ended

The request is written by the thread that steps the engine only; the handle reads what that
thread published under one lock, so an HTTP event loop or any other thread may hold handles while
the engine steps elsewhere. A handle iterated where nothing steps in the background drives the
steps itself (the single-threaded Python API: submit, then iterate).
"""

from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from pyengine.serve.params import SamplingParams


class Finish(str, enum.Enum):
    """Why a request ended (the OpenAI API's finish_reason for the first two)."""

    STOP = "stop"
    """It drew one of its stop ids or the model's end-of-sequence ids."""
    LENGTH = "length"
    """It reached max_new_tokens."""
    ABORT = "abort"
    """Its submitter aborted it (a client that went away) or the server stopped it."""
    FAILED = "failed"
    """The engine failed under it (a rank died): its ids so far are all it will get."""


class RequestFailed(RuntimeError):
    """result() of a request the engine could not finish; the message says why."""


@dataclass(slots=True)
class Request:
    """Scheduler-side state of one request (touched by the stepping thread only)."""

    id: int
    prompt: tuple[int, ...]
    params: SamplingParams
    stop_ids: frozenset[int]
    arrival: float = field(default_factory=time.monotonic)
    slot: int | None = None
    """Its KV-cache slot while admitted."""
    blocks: int = 0
    """KV blocks reserved for it at admission (prompt + max_new_tokens)."""
    fed: int = 0
    """Prompt tokens already fed (its prefill's progress)."""
    out: list[int] = field(default_factory=list)
    finish: Finish | None = None
    error: str = ""
    """Why the server ended it (an abort at shutdown), for its client; empty otherwise."""

    @property
    def prefilling(self) -> bool:
        return self.fed < len(self.prompt)

    @property
    def cached(self) -> int:
        """Its tokens in the KV cache: the prompt fed so far, then every new id but the last."""
        return self.fed + max(0, len(self.out) - 1)

    def finish_after(self, token: int) -> Finish | None:
        """Why it ends once `token` is appended (None: it goes on)."""
        if token in self.stop_ids:
            return Finish.STOP
        if len(self.out) >= self.params.max_new_tokens:
            return Finish.LENGTH
        return None


class RequestHandle:
    """The submitter's view: new ids as they come, then why it ended."""

    def __init__(self, request_id: int, prompt_tokens: int, pump: Callable[[], bool] | None):
        self.id = request_id
        self.prompt_tokens = prompt_tokens
        self._pump = pump  # runs one engine step (manual mode): whether a plan ran; None: a thread steps
        self._lock = threading.Condition()
        self._ids: list[int] = []
        self._finish: Finish | None = None
        self._error = ""
        self._abort: Callable[[], None] | None = None
        self.listeners: list[Callable[[], None]] = []
        """Called (on the stepping thread) after every change: an event loop's wake-up."""
        self.first_token_at: float | None = None
        self.submitted_at = time.monotonic()

    # ---- written by the stepping thread -------------------------------------------------------
    def publish(self, token: int | None, finish: Finish | None, error: str = "") -> None:
        with self._lock:
            if token is not None:
                self._ids.append(token)
                if self.first_token_at is None:
                    self.first_token_at = time.monotonic()
            if finish is not None and self._finish is None:
                self._finish, self._error = finish, error
            self._lock.notify_all()
        for wake in list(self.listeners):
            wake()

    # ---- read by anyone ------------------------------------------------------------------------
    @property
    def finish(self) -> Finish | None:
        with self._lock:
            return self._finish

    @property
    def error(self) -> str:
        with self._lock:
            return self._error

    def snapshot(self) -> tuple[list[int], Finish | None]:
        """The ids so far (a copy) and why it ended (None while it runs)."""
        with self._lock:
            return list(self._ids), self._finish

    def abort(self) -> None:
        """Ask the engine to end it at the next step (its blocks are freed then)."""
        if self._abort is not None:
            self._abort()

    def __iter__(self) -> Iterator[int]:
        seen = 0
        while True:
            with self._lock:
                if seen < len(self._ids):
                    token = self._ids[seen]
                elif self._finish is not None:
                    if self._finish is Finish.FAILED:
                        raise RequestFailed(self._error)
                    return
                elif self._pump is None:
                    self._lock.wait(timeout=1.0)
                    continue
                else:
                    token = None
            if token is None:
                if not self._pump() and self.finish is None:
                    raise RuntimeError(f"request {self.id} cannot progress: the session ran no step "
                                       "(it was never admitted)")
                continue
            seen += 1
            yield token

    def result(self) -> list[int]:
        """Every new id, once it has ended (driving the steps in manual mode)."""
        return list(self)
