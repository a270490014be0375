"""Injected faults (a testing hook of `pyengine run`): kill or stall one rank at one action, so
tests can prove a dead or stuck rank ends the job with an error naming it."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

MODES = ("exit", "hang")


@dataclass(frozen=True, slots=True)
class Fault:
    rank: int
    action: str
    """The action id (as printed in traces and NVTX ranges) at which the fault fires."""
    mode: str
    """exit: the rank dies (a process exits at once; a thread raises); hang: it stalls forever."""

    @classmethod
    def parse(cls, text: str) -> Fault:
        """'RANK:ACTION_ID:exit|hang' -> Fault (ValueError naming the rule otherwise)."""
        parts = text.split(":")
        if len(parts) != 3 or not parts[0].isdigit() or parts[2] not in MODES:
            raise ValueError(f"fault = {text!r}: expected RANK:ACTION_ID:exit|hang")
        return cls(int(parts[0]), parts[1], parts[2])

    def trigger(self) -> None:
        if self.mode == "hang":
            while True:  # a stalled rank: peers must time out and name it
                time.sleep(3600)
        if threading.current_thread() is threading.main_thread():
            os._exit(17)  # a dead process: no exception, no cleanup, like a crash
        raise RuntimeError(f"injected fault: virtual rank {self.rank} died at {self.action}")
