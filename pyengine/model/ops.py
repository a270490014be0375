"""The kernels a rank's stage computes launch, prepared once per rank (`ops_for`): `TorchOps`
(pyengine.model.ops_torch) or `TritonOps` (pyengine.model.ops_triton), by `PYENGINE_KERNELS`
(pyengine.model.kernel_path). The stages call the one object and never ask which it is."""

from __future__ import annotations

import torch

from pyengine.model.kernel_path import KernelPath, kernel_path
from pyengine.model.ops_torch import TorchOps


def ops_class(path: KernelPath) -> type:
    """The ops type of a path (its traits: `graphable`, `not_graphable`), without preparing one."""
    if path is KernelPath.TORCH:
        return TorchOps
    from pyengine.model.ops_triton import TritonOps

    return TritonOps


def ops_for(spec, device: torch.device, path: KernelPath | None = None):
    """The rank's ops (made once per runtime: the Triton path prepares its kernels here)."""
    cls = ops_class(path or kernel_path(device))
    return cls() if cls is TorchOps else cls(spec, device)
