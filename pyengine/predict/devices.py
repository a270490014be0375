"""Device profiles: what one GPU and its links can do, for the planner's roofline.

A profile holds peak numbers; the planner multiplies them by efficiency factors (the
achievable fraction of peak) before predicting an op's time:

    compute op:  kernel_launch_us + max(flops / (peak_tflops[dtype] * gemm_efficiency),
                                        hbm_bytes / (hbm_gb_s * bandwidth_efficiency))
    transfer:    latency + bytes / (link_gb_s * bandwidth_efficiency)

The presets are datasheet-style assumptions, not measurements. Measured numbers go in a
JSON file with the same fields (`load_profile("my_gpu.json")`); a file may name a preset
in `"base"` and override only some fields.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from pyengine.core.collectives import Collective
from pyengine.core.limits import check_number
from pyengine.core.spec import SpecError
from pyengine.core.spec_parse import parse_json


class DeviceProfileError(SpecError):
    """A device profile file or name is invalid; `field` is `device.<key>`."""


@dataclass(kw_only=True, slots=True, frozen=True)
class DeviceProfile:
    name: str
    """Shown in every plan so a reader knows which numbers a prediction rests on."""
    peak_tflops_bf16: float
    """Dense (no sparsity) bf16 tensor-core peak, TFLOP/s."""
    peak_tflops_fp16: float
    """Dense fp16 tensor-core peak, TFLOP/s."""
    peak_tflops_fp32: float
    """Plain fp32 (non-tensor-core) peak, TFLOP/s."""
    hbm_gb_s: float
    """Device memory bandwidth, GB/s (1 GB = 1e9 bytes)."""
    memory_gb: float
    """Device memory, GB (the plan's fit check uses the spec's hardware.gpu_memory_gb)."""
    nvlink_gb_s: float
    """NVLink bandwidth between two GPUs, per direction, GB/s."""
    nvlink_latency_us: float
    """Per-message latency on NVLink (NCCL point-to-point, small message), microseconds."""
    pcie_gb_s: float
    """PCIe bandwidth per direction, GB/s."""
    pcie_latency_us: float
    """Per-message latency over PCIe, microseconds."""
    gemm_efficiency: float = 0.7
    """Achievable fraction of peak FLOP/s in a large GEMM (0.7: typical cuBLAS at big shapes)."""
    bandwidth_efficiency: float = 0.8
    """Achievable fraction of peak HBM and link bandwidth (0.8: typical streaming copy / NCCL busbw)."""
    reserved_gb: float = 1.0
    """Memory not available to the model: CUDA context, NCCL buffers, allocator slack."""
    kernel_launch_us: float = 4.0
    """Fixed cost added to every kernel (launch + tail): dominates at tiny shapes."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "name":
                if not isinstance(v, str) or not v:
                    raise DeviceProfileError("device.name", v, "must be a non-empty string")
                continue
            check_number(f"device.{f.name}", v, error=DeviceProfileError)  # finite: no NaN/Inf
            if f.name == "reserved_gb":
                if v < 0:
                    raise DeviceProfileError(f"device.{f.name}", v, "must be >= 0")
            elif f.name.endswith("_us"):
                if v < 0:
                    raise DeviceProfileError(f"device.{f.name}", v, "must be >= 0")
            elif f.name.endswith("efficiency"):
                if not 0 < v <= 1:
                    raise DeviceProfileError(f"device.{f.name}", v, "must be in (0, 1]")
            elif v <= 0:
                raise DeviceProfileError(f"device.{f.name}", v, "must be > 0")

    # ---- achievable rates ------------------------------------------------------------
    def flops_per_s(self, dtype: str) -> float:
        """Achievable FLOP/s for a GEMM in `dtype` (peak x gemm_efficiency)."""
        peak = {"bfloat16": self.peak_tflops_bf16, "float16": self.peak_tflops_fp16,
                "float32": self.peak_tflops_fp32}[dtype]
        return peak * 1e12 * self.gemm_efficiency

    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gb_s * 1e9 * self.bandwidth_efficiency

    def link(self, interconnect: str) -> tuple[float, float]:
        """(achievable bytes/s per direction, latency in s) of one GPU-to-GPU link."""
        if interconnect == "nvlink":
            return self.nvlink_gb_s * 1e9 * self.bandwidth_efficiency, self.nvlink_latency_us * 1e-6
        if interconnect == "pcie":
            return self.pcie_gb_s * 1e9 * self.bandwidth_efficiency, self.pcie_latency_us * 1e-6
        raise ValueError(f"interconnect = {interconnect!r}: must be 'nvlink' or 'pcie'")

    # ---- op times ----------------------------------------------------------------------
    def compute_s(self, flops: float, hbm_bytes: float, dtype: str) -> float:
        """Roofline time of one kernel: bound by math or by memory traffic, whichever is
        slower, plus the fixed launch cost."""
        return (self.kernel_launch_us * 1e-6
                + max(flops / self.flops_per_s(dtype), hbm_bytes / self.hbm_bytes_per_s()))

    def transfer_s(self, nbytes: float, interconnect: str) -> float:
        """One point-to-point message."""
        bw, lat = self.link(interconnect)
        return lat + nbytes / bw

    def collective_s(self, collective: Collective, nbytes: float, n: int, interconnect: str) -> float:
        """Ring `collective` of an `nbytes` buffer over n GPUs: its latency-bound steps plus
        its bus factor times the bytes over one link (all-reduce: 2(n-1) steps, 2(n-1)/n)."""
        if n <= 1:
            return 0.0
        bw, lat = self.link(interconnect)
        return collective.ring_steps(n) * lat + collective.bus_factor(n) * nbytes / bw

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Datasheet-style presets (assumptions, not measurements; override with a JSON profile).
PRESETS: dict[str, DeviceProfile] = {
    "h100": DeviceProfile(
        # H100 SXM5: 989 TFLOP/s dense bf16/fp16, 67 fp32 (non-tensor), HBM3 3.35 TB/s, 80 GB,
        # NVLink4 900 GB/s bidirectional = 450 per direction; PCIe Gen5 x16 ~64 GB/s per direction.
        name="h100", peak_tflops_bf16=989.0, peak_tflops_fp16=989.0, peak_tflops_fp32=67.0,
        hbm_gb_s=3350.0, memory_gb=80.0, nvlink_gb_s=450.0, nvlink_latency_us=3.0,
        pcie_gb_s=64.0, pcie_latency_us=6.0),
    "h200": DeviceProfile(
        # H200 SXM: H100's compute, HBM3e 4.8 TB/s, 141 GB, same NVLink4.
        name="h200", peak_tflops_bf16=989.0, peak_tflops_fp16=989.0, peak_tflops_fp32=67.0,
        hbm_gb_s=4800.0, memory_gb=141.0, nvlink_gb_s=450.0, nvlink_latency_us=3.0,
        pcie_gb_s=64.0, pcie_latency_us=6.0),
    "seed32g": DeviceProfile(
        # The seed's "32 GB GPU", taken as a V100-SXM2-32GB-class part: 125 TFLOP/s fp16 tensor,
        # 15.7 fp32, 900 GB/s HBM2, NVLink2 6 links x 25 GB/s = 150 per direction, PCIe Gen3
        # ~16 GB/s. A real V100 has no bf16 tensor cores; the bf16 figure assumes a part that
        # runs bf16 at its fp16 rate. These are assumptions, not measurements.
        name="seed32g", peak_tflops_bf16=125.0, peak_tflops_fp16=125.0, peak_tflops_fp32=15.7,
        hbm_gb_s=900.0, memory_gb=32.0, nvlink_gb_s=150.0, nvlink_latency_us=5.0,
        pcie_gb_s=16.0, pcie_latency_us=8.0),
}

DEFAULT_PRESET = "seed32g"
"""Profile used when none is named: the seed config describes 32 GB GPUs."""


def load_profile(name_or_path: str | os.PathLike | DeviceProfile | None = None) -> DeviceProfile:
    """A preset by name (h100, h200, seed32g), a JSON file with the same fields, or None
    (DEFAULT_PRESET). A JSON file may set "base": "<preset>" and override only some fields."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    if name_or_path is None:
        return PRESETS[DEFAULT_PRESET]
    key = os.fspath(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    if not os.path.exists(key):
        raise DeviceProfileError("device", key,
                                 f"neither a preset ({', '.join(PRESETS)}) nor an existing file")
    try:
        with open(key, "rb") as f:
            text = f.read()
    except OSError as e:
        raise DeviceProfileError("device", key, f"cannot be read: {e.strerror}") from None
    try:  # the spec's strict JSON: UTF-8 only, no NaN/Infinity, no duplicate keys, bounded depth
        data = parse_json(text, key)
    except SpecError as e:
        raise DeviceProfileError(e.field, e.value, e.rule) from None
    return profile_from_dict(data, default_name=os.path.splitext(os.path.basename(key))[0])


def profile_from_dict(data: Any, default_name: str = "custom") -> DeviceProfile:
    if not isinstance(data, dict):
        raise DeviceProfileError("device", data, "must be a JSON object")
    data = dict(data)
    fields = {f.name: f for f in dataclasses.fields(DeviceProfile)}
    base = data.pop("base", None)
    values: dict[str, Any] = {}
    if base is not None:
        if base not in PRESETS:
            raise DeviceProfileError("device.base", base, f"must be one of {sorted(PRESETS)}")
        values = PRESETS[base].to_dict()
        values["name"] = f"{default_name} (from {base})"
    for key, v in data.items():
        if key not in fields:
            raise DeviceProfileError(f"device.{key}", v, f"unknown field; known: {sorted(fields)}")
        values[key] = v
    values.setdefault("name", default_name)
    for name, f in fields.items():
        if name not in values and f.default is dataclasses.MISSING:
            raise DeviceProfileError(f"device.{name}", None, "is required (or set \"base\" to a preset)")
    return DeviceProfile(**values)
