"""Where a figure came from: machine, date, commit and command, recorded with every benchmark row.

Torch-free at import (the kernel tuner and the planner use `git_commit` too); torch is asked
about the device only when a device is named.
"""

from __future__ import annotations

import datetime
import os
import shlex
import subprocess
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def git_commit() -> str:
    """Short commit of the checkout this package runs from ('unknown' outside git); PYENGINE_COMMIT,
    when set, names it instead (a copy of a tree whose .git is not the one it came from)."""
    if os.environ.get("PYENGINE_COMMIT"):
        return os.environ["PYENGINE_COMMIT"][:12]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        import torch

        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores)"


def gpu_state() -> str:
    """nvidia-smi's name, SM clock and power limit, logged with every GPU benchmark."""
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,clocks.sm,power.limit", "--format=csv"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi unavailable: {e}"


def command_line(module: str = "") -> str:
    """The command as a user would retype it (`python -m X` and `pyengine ...` spelled out)."""
    argv0 = sys.argv[0] if sys.argv else ""
    mod_path = module.replace(".", os.sep)
    if module and (argv0.endswith(mod_path + ".py") or argv0.endswith(os.path.join(mod_path, "__main__.py"))):
        prog = ["python", "-m", module]  # python -m module
    elif argv0.endswith("__main__.py"):  # python -m pyengine ...
        prog = ["pyengine"]
    else:
        prog = ["python", argv0] if argv0.endswith(".py") else [os.path.basename(argv0)]
    return shlex.join(prog + sys.argv[1:])


def now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def record(device: torch.device, module: str = "") -> dict:
    """The provenance block every benchmark prints and stores with its rows."""
    import torch

    out = {"device": device_name(device), "date": now(), "commit": git_commit(),
           "command": command_line(module), "torch": torch.__version__}
    if device.type == "cuda":
        out["nvidia_smi"] = gpu_state()
    return out
