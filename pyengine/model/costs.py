"""The unit of the roofline: one kernel's FLOPs and HBM bytes (a multiply-add counts as 2 FLOPs;
element-wise work shows up as bytes, not FLOPs)."""

from __future__ import annotations

from typing import NamedTuple


class KernelCost(NamedTuple):
    name: str
    flops: float
    hbm_bytes: float
