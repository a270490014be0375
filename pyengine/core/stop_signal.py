"""A stop signal (SIGTERM, SIGHUP) received by the CLI: the exception it raises in the main thread,
and a record that it came.

The CLI's handler raises `Terminated` where the main thread happens to be. If that is a place
whose exceptions Python only reports (a finalizer, a weakref or C callback during an import), the
raise is lost, and since the handler already ignores later signals (so that they cannot break the
first one's cleanup) the job would run on forever. So the handler also records the signal here,
and a launcher's watch loop calls `raise_if_stopped()`: a recorded signal that is still not
handled is raised again there."""

from __future__ import annotations

import signal

_received: int | None = None


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP, raised in the main thread so that every launcher's cleanup runs
    (children stopped, queues closed) exactly as on Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.name, self.code = signal.Signals(signum).name, 128 + signum


def record(signum: int | None) -> None:
    """The signal the handler is raising (None: forget it, once it has been handled)."""
    global _received
    _received = signum


def raise_if_stopped() -> None:
    """Raise the recorded stop signal again: its first raise was lost (see the module doc)."""
    if _received is not None:
        raise Terminated(_received)
