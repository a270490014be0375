"""Injected faults (a testing hook of `pyengine run`): kill or stall one rank at one action, so
tests can prove a dead or stuck rank ends the job with an error naming it; or poison its weights
with NaN, so tests can prove non-finite logits fail the output check end to end."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

MODES = ("exit", "hang", "nan")


@dataclass(frozen=True, slots=True)
class Fault:
    rank: int
    action: str
    """The action id (as printed in traces and NVTX ranges) at which the fault fires."""
    mode: str
    """exit: the rank dies (a process exits at once; a thread raises); hang: it stalls forever;
    nan: its weights become NaN from this action on (the run goes on)."""

    @classmethod
    def parse(cls, text: str) -> Fault:
        """'RANK:ACTION_ID:exit|hang' -> Fault (ValueError naming the rule otherwise)."""
        parts = text.split(":")
        if len(parts) != 3 or not parts[0].isdigit() or parts[2] not in MODES:
            raise ValueError(f"fault = {text!r}: expected RANK:ACTION_ID:{'|'.join(MODES)}")
        return cls(int(parts[0]), parts[1], parts[2])

    def trigger(self, weights: dict | None = None) -> None:
        if self.mode == "nan":
            for t in (weights or {}).values():
                if t.is_floating_point():
                    t.fill_(float("nan"))
            return
        if self.mode == "hang":
            while True:  # a stalled rank: peers must time out and name it
                time.sleep(3600)
        if threading.current_thread() is threading.main_thread():
            os._exit(17)  # a dead process: no exception, no cleanup, like a crash
        raise RuntimeError(f"injected fault: virtual rank {self.rank} died at {self.action}")
