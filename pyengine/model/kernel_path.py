"""Which kernels a rank's stage computes launch: the torch path or the Triton path, chosen once per rank.

`PYENGINE_KERNELS` = auto (default: Triton on CUDA, torch on CPU) | torch | triton. `triton` on CPU
runs the Triton kernels under the interpreter (`TRITON_INTERPRET=1`, set before pyengine.kernels is
first imported), so the decode step a GPU runs is the one CI tests and counts (bf16 excepted: the
interpreter's bf16 dot is wrong). Both paths read the same static state (the KV cache, the RoPE
tables, the chunk tables); the stages call one `Ops` object and never ask which path it is.
"""

from __future__ import annotations

import enum
import os
import torch

from pyengine.core.errors import InputError

ENV = "PYENGINE_KERNELS"
CHOICES = ("auto", "torch", "triton")


class KernelPath(str, enum.Enum):
    TORCH = "torch"
    TRITON = "triton"


def kernel_path(device: torch.device) -> KernelPath:
    """The path for `device` under PYENGINE_KERNELS (checked: one line naming the variable)."""
    value = os.environ.get(ENV, "auto").strip().lower()
    if value not in CHOICES:
        raise InputError(ENV, value, f"must be one of {', '.join(CHOICES)}")
    if value == "auto":
        return KernelPath.TRITON if device.type == "cuda" else KernelPath.TORCH
    if value == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(ENV, value, f"the Triton path on {device.type} needs the Triton interpreter "
                         "(TRITON_INTERPRET=1, set before pyengine.kernels is first imported)")
    return KernelPath(value)
