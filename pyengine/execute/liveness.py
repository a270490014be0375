"""Liveness and last action of every rank, so that a failure names the rank that caused it.

When a rank is killed (SIGKILL, the OOM killer) or stalls (SIGSTOP, an endless kernel), the
rank that *notices* is a live peer whose wait timed out or whose connection closed. Naming that
peer blames a bystander. So each rank keeps a record on a shared `Board`:

    state    running | done | failed (a real error) | waited (failed waiting on a peer)
    action   the action it is in (set through RankRuntime's `on_action` hook)
    wait_on  the action whose completion it is blocked on, or "" while it works
    since    when it entered the current action or wait (time.monotonic: system-wide on Linux)
    beat     a heartbeat (process backends), so a frozen process shows as silent

and the launcher's `blame` (pyengine.execute.blame) reads the records when a failure surfaces.
The board is a shared-memory block written with plain stores: an action change costs about a
microsecond (a store round trip per action would show up in the measured latencies), and a
record survives its writer's SIGKILL. The same board serves threads (one process) and spawned
processes (the block travels to them at spawn); each record is guarded by a sequence number so
a reader never sees half a write.
"""

from __future__ import annotations

import contextlib
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

HEARTBEAT_S = 0.25
"""How often a rank process refreshes its heartbeat."""

RUNNING, DONE, FAILED, WAITED = 1, 2, 3, 4
STATES = {0: "not started", RUNNING: "running", DONE: "done", FAILED: "failed", WAITED: "waited"}

_TEXT = 96  # bytes of an action id kept (ids are ~30 characters)
_HEAD = struct.Struct("<IBBxxqd")  # seq, state, waiting, count, since
_BEAT = struct.Struct("<d")
_OFF_BEAT = _HEAD.size
_OFF_TEXT = _OFF_BEAT + _BEAT.size
RECORD = _OFF_TEXT + 2 * _TEXT


@dataclass(frozen=True, slots=True)
class Record:
    rank: int
    state: int
    waiting: bool
    count: int
    since: float
    beat: float
    action: str
    wait_on: str

    @property
    def running(self) -> bool:
        return self.state == RUNNING


class Board:
    """One record per rank in one buffer: a bytearray (threads) or a multiprocessing RawArray
    (spawned processes; it pickles into the children only while they are being started)."""

    def __init__(self, world_size: int, buffer: Any):
        self.world_size = world_size
        self.buffer = buffer

    @classmethod
    def for_threads(cls, world_size: int) -> Board:
        return cls(world_size, bytearray(RECORD * world_size))

    @classmethod
    def for_processes(cls, world_size: int, mp_context: Any) -> Board:
        import ctypes

        return cls(world_size, mp_context.RawArray(ctypes.c_char, RECORD * world_size))

    def __getstate__(self) -> tuple:
        return self.world_size, self.buffer

    def __setstate__(self, state: tuple) -> None:
        self.world_size, self.buffer = state

    def _view(self) -> memoryview:
        return memoryview(self.buffer).cast("B")

    def write(self, rank: int, state: int, waiting: bool, count: int, since: float, action: str,
              wait_on: str) -> None:
        view, base = self._view(), rank * RECORD
        seq = _HEAD.unpack_from(view, base)[0]
        _HEAD.pack_into(view, base, seq + 1, state, waiting, count, since)  # odd: being written
        struct.pack_into(f"{_TEXT}s{_TEXT}s", view, base + _OFF_TEXT, _encode(action), _encode(wait_on))
        _HEAD.pack_into(view, base, seq + 2, state, waiting, count, since)

    def beat(self, rank: int, now: float) -> None:
        _BEAT.pack_into(self._view(), rank * RECORD + _OFF_BEAT, now)

    def read(self, rank: int) -> Record:
        view, base = self._view(), rank * RECORD
        for _ in range(1000):
            seq, state, waiting, count, since = _HEAD.unpack_from(view, base)
            action, wait_on = struct.unpack_from(f"{_TEXT}s{_TEXT}s", view, base + _OFF_TEXT)
            if seq % 2 == 0 and _HEAD.unpack_from(view, base)[0] == seq:
                break
            time.sleep(0)  # a writer is mid-record: let it finish
        (beat,) = _BEAT.unpack_from(view, base + _OFF_BEAT)
        return Record(rank, state, bool(waiting), count, since, beat, _decode(action), _decode(wait_on))

    def records(self) -> list[Record]:
        return [self.read(r) for r in range(self.world_size)]


def _encode(text: str) -> bytes:
    return text.encode("utf-8", "replace")[:_TEXT]


def _decode(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode("utf-8", "replace")


class Stopped(RuntimeError):
    """Raised in a virtual rank at its next action when the launcher stops the job (Ctrl-C)."""


class Beacon:
    """A rank's writer of its record. `on_action` is RankRuntime's hook; use as a context
    manager around the rank's body, which marks it running, then done or failed."""

    def __init__(self, board: Board, rank: int, *, heartbeat: bool,
                 stop: threading.Event | None = None):
        self.board, self.rank = board, rank
        self._heartbeat = heartbeat
        self._stop_job = stop
        self._state, self._count, self._since = RUNNING, 0, time.monotonic()
        self._action, self._wait_on = "start-up", ""
        self._quit = threading.Event()
        self._thread: threading.Thread | None = None

    def on_action(self, action: str, waiting: bool) -> None:
        """`action` entered (waiting=False) or its completion awaited (waiting=True); the next
        call with waiting=False ends the wait."""
        if self._stop_job is not None and self._stop_job.is_set():
            raise Stopped(f"rank {self.rank} stopped by the launcher")
        if waiting:
            self._wait_on = action
        else:
            self._action, self._wait_on = action, ""
        self._count += 1
        self._since = time.monotonic()
        self._publish()

    @contextlib.contextmanager
    def waiting(self, label: str) -> Iterator[None]:
        """Mark a wait outside the runtime (a barrier): the rank is blocked on its peers."""
        self.on_action(label, True)
        try:
            yield
        finally:
            self._wait_on = ""
            self._count += 1
            self._since = time.monotonic()
            self._publish()

    def _publish(self) -> None:
        self.board.write(self.rank, self._state, bool(self._wait_on), self._count, self._since,
                         self._action, self._wait_on)

    def _beat(self) -> None:
        while not self._quit.wait(HEARTBEAT_S):
            self.board.beat(self.rank, time.monotonic())

    def __enter__(self) -> Beacon:
        self._publish()
        if self._heartbeat:  # threads share one process: no heartbeat of their own (beat stays 0)
            self.board.beat(self.rank, time.monotonic())
            self._thread = threading.Thread(target=self._beat, name=f"pyengine-beat{self.rank}",
                                            daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        self._quit.set()
        self._state = DONE if exc is None else WAITED if waited_on_peer(exc) else FAILED
        self._publish()


PEER_GONE = ("connection closed by peer", "connection reset by peer", "broken pipe")
"""What gloo raises (a plain RuntimeError, even when an op is only being posted) when the
other end of a pair died: a peer's death, never this rank's own fault."""


def waited_on_peer(exc: BaseException) -> bool:
    """True when `exc` is what a rank sees of someone else's failure: a transport timeout or
    closed connection, a broken barrier, a store error, or the launcher stopping it."""
    names = {"TransportError", "BrokenBarrierError", "DistError", "DistNetworkError",
             "DistStoreError", "Stopped"}
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if names & {t.__name__ for t in type(e).__mro__}:
            return True
        if any(gone in str(e).lower() for gone in PEER_GONE):
            return True
        e = e.__cause__ or e.__context__
    return False
