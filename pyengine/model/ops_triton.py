"""The Triton path of the stages' kernels (pyengine.kernels), prepared once per rank.

Input checks and config selection happen here, at set-up, not per call: the prepared launchers take
the hot path's tensors as they are (the engine made them) and launch, with no host sync, so a
decode step's kernels can be captured in a CUDA graph. Each op falls back to the torch path's where
no Triton kernel exists for it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

import torch

from pyengine.model.ops import KernelPath, TorchOps

_INTERPRETER = threading.Lock()
"""Triton's interpreter patches module state while a kernel runs: on CPU the ranks' threads (the
local transport) take turns. Compiled kernels on a GPU need no lock."""


class TritonOps(TorchOps):
    path = KernelPath.TRITON

    def __init__(self, spec, device: torch.device):
        self.spec, self.device = spec, device
        self._turns = _INTERPRETER if device.type != "cuda" else contextlib.nullcontext()

    def residual_norm(self, x, partials, w, eps, keep_residual=True):
        from pyengine.kernels.residual_rmsnorm import fused_residual_rmsnorm

        with self._turns:
            if keep_residual:
                return fused_residual_rmsnorm(x, partials, w, eps, return_residual=True)
            return None, fused_residual_rmsnorm(x, partials, w, eps)

    def experts(self, w: Mapping[str, Any], u, ids, weights, skip_ids=False):
        from pyengine.kernels.moe_expert_shard import moe_expert_shard

        # ids come from our own router (in range by construction): no range check, whose host
        # sync would stall the asynchronous issue of the pipeline.
        with self._turns:
            return moe_expert_shard(u, w["w_gate"], w["w_up"], w["w_down"], ids, weights, check_ids=False,
                                    skip_ids=skip_ids)
