"""Sane bounds of every number a user can give (config fields, command-line flags, device
profiles), and one checker that names the field, the value and the bound it breaks.

Why bounds at all: NaN compares False with everything, so `x <= 0` lets it through; an
Infinity or a 10**40 reaches timedelta(), threading waits or tensor shapes and fails deep inside
a rank with a traceback. Refusing them here keeps "exit 2 before anything starts" true.
"""

from __future__ import annotations

import math
from typing import Any

from pyengine.core.errors import InputError

MAX_INT = 2**31 - 1
"""Largest integer in a spec: every count and size fits a 32-bit index (kernels index with int32)."""
MAX_INT_DIGITS = 19
"""Longest integer literal read from JSON (a 5000-digit literal must not reach int())."""
MIN_TIMEOUT_S = 1.0
"""Shortest per-action timeout. The ranks' first waits (connecting their transports, the start-up
barrier) take tens to hundreds of milliseconds on a loaded host: with 1 ms every job died at
start-up, blaming a healthy rank as stalled."""
TIMEOUT_WHY = " seconds per action (below 1 s the ranks cannot even connect at start-up)"
"""What a refused timeout is told, after its range."""
MAX_TIMEOUT_S = 86_400.0
"""Longest per-action timeout (a day): beyond it timedelta and thread waits overflow."""
MAX_LAYERS = 1024
"""Most decoder layers a model may have. The deepest published models have about 130; every
prediction and schedule holds each layer's actions, so a model of 100,000 layers would be priced
for many minutes before anything said a word: refused at once instead."""
MAX_EXPERTS = 4096
"""Most experts a model may have. Published MoE models have at most a few hundred; expert-parallel
layouts list every expert id, so 10 million experts made each candidate layout a ten-million-entry
config and a refusal took seconds to minutes: refused at once instead."""
MAX_ITERS = 1_000_000
"""Most timed or warm-up iterations a command accepts."""
MAX_SEED = 2**62
"""Largest seed (torch generators take < 2**64; the weights add offsets to it)."""


def check_number(field: str, value: Any, *, lo: float | None = None, hi: float | None = None,
                 lo_open: bool = False, integer: bool = False,
                 error: type[InputError] = InputError, why: str = "") -> None:
    """Raise `error(field, value, rule)` unless `value` is a finite number (an int when
    `integer`) within [lo, hi] ((lo, hi] when `lo_open`); `why` follows a refused range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise error(field, value, "must be an integer" if integer else "must be a number")
    if integer and not isinstance(value, int):
        raise error(field, value, "must be an integer")
    if isinstance(value, float) and not math.isfinite(value):
        raise error(field, value, "must be a finite number (NaN and Infinity are refused)")
    low_ok = lo is None or (value > lo if lo_open else value >= lo)
    if low_ok and (hi is None or value <= hi):
        return
    raise error(field, value, f"must be {_range(lo, hi, lo_open)}{why}")


def _range(lo: float | None, hi: float | None, lo_open: bool) -> str:
    if hi is None:
        return f"{'>' if lo_open else '>='} {_num(lo)}"
    if lo is None:
        return f"<= {_num(hi)}"
    return f"in {'(' if lo_open else '['}{_num(lo)}, {_num(hi)}]"


def _num(x: float | None) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"
