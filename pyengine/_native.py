"""Loads pyengine._C after making the NCCL shared library from nvidia-nccl-cu13 visible."""

from __future__ import annotations

import ctypes
import os
from functools import cache
from types import ModuleType


def _preload_nccl() -> None:
    # The wheel ships libnccl.so.2 without a linker-visible path; load it globally
    # first so the extension's NEEDED entry resolves (the same trick torch uses).
    try:
        import nvidia.nccl
    except ImportError:
        return
    for root in nvidia.nccl.__path__:
        lib = os.path.join(root, "lib", "libnccl.so.2")
        if os.path.exists(lib):
            ctypes.CDLL(lib, mode=ctypes.RTLD_GLOBAL)
            return


@cache
def native() -> ModuleType:
    """The compiled extension (imported on first use, never at package import)."""
    _preload_nccl()
    from pyengine import _C

    return _C
