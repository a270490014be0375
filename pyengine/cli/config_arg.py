"""--config and the flags that override it (--schedule, --micro-batches, --timeout), for `run` and
`generate`: the flags are set in the parsed config before it is checked, once, as the job will
run it. Checked first and overridden after, a config refused for a field the flag was there to
change (micro_batches above the token count) could never be rescued by the flag."""

from __future__ import annotations

import argparse
from typing import Any

from pyengine.core.errors import SpecError, UsageError

FLAG_FIELDS = {"--schedule": ("schedule", "kind"), "--micro-batches": ("schedule", "micro_batches"),
               "--timeout": ("comm", "timeout_s")}
"""Each overriding flag and the config field it sets."""


def flagged_config(args: argparse.Namespace, layout_only: bool = False) -> Any:
    """The parsed --config (default: the packaged seed) with the flags given set in it, not yet
    validated. `layout_only`: of the default's model keep only the batch shape (a checkpoint
    gives the rest)."""
    from pyengine.core.spec import read_config

    data = read_config(args.config)
    if not isinstance(data, dict):
        return data  # validation names what is wrong with it
    if layout_only and args.config is None and isinstance(data.get("model"), dict):
        data["model"] = {k: v for k, v in data["model"].items() if k in ("batch_size", "seq_len")}
    for flag, (section, key) in FLAG_FIELDS.items():
        value = getattr(args, _dest(flag), None)
        if value is not None and isinstance(data.setdefault(section, {}), dict):
            data[section][key] = value
    return data


def flag_blame(args: argparse.Namespace, e: SpecError) -> Exception:
    """A SpecError about a field a flag set, as the flag's UsageError (the user typed the flag,
    not the field); any other, unchanged."""
    for flag, (section, key) in FLAG_FIELDS.items():
        value = getattr(args, _dest(flag), None)
        if value is not None and e.field == f"{section}.{key}":
            return UsageError(flag, value, e.rule)
    return e


def _dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
