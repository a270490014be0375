"""Environment variables the engine reads (torchrun's RANK, WORLD_SIZE, ...), checked like
flags: a bad value is one line naming the variable and the value, exit 2, before any work."""

from __future__ import annotations

import os

from pyengine.core.errors import InputError


class EnvError(InputError):
    """An environment variable breaks a rule. `field` names the variable."""

    kind = "bad environment variable"


def env_int(name: str, default: int | None = None, *, low: int = 0,
            high: int | None = None) -> int | None:
    """The integer in $name (`default` when unset), refused unless in [low, high]."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    top = "" if high is None else f" and <= {high}"
    try:
        value = int(raw.strip())
    except ValueError:
        raise EnvError(name, raw, f"must be an integer >= {low}{top}") from None
    if value < low or (high is not None and value > high):
        raise EnvError(name, raw, f"must be an integer >= {low}{top}")
    return value
