"""A device profile: what one GPU and its links can do, and the planner's time model of an op on it.

Peaks come from the datasheet; every other number says how much of a peak real kernels reach,
each named for what it is, each with its source (`sources`: datasheet, a published measurement,
a fit to published rows, this engine's own measured file, or an assumption). The model:

  kernel      kernel_launch_us + max(FLOPs / (peak[dtype] x eff), HBM bytes / (hbm_gb_s x hbm_efficiency))
              eff by what the kernel is (pyengine.model.costs.KernelKind):
                GEMM     gemm_efficiency x M / (M + gemm_half_rows)          (M = its rows)
                GROUPED  grouped_gemm_efficiency x m / (m + grouped_gemm_half_rows)
                                                                   (m = rows per touched expert)
                MEMORY   bytes only
  send/recv   link latency + bytes / (link line rate x link_efficiency)
  collective  collective_base_us + ring steps x collective_step_us
              + bus factor x bytes / (line rate x link_efficiency)

The corner between compute and memory is sharp (max): against the published H100 rows a
smooth corner fits no better once the GEMM efficiency follows the rows per expert
(docs/planner_calibration.md). The presets live in pyengine.predict.presets, the file format
in pyengine.predict.devices.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field

from pyengine.core.collectives import Collective
from pyengine.core.limits import check_number
from pyengine.core.spec import SpecError
from pyengine.model.costs import KernelCost, KernelKind


class DeviceProfileError(SpecError):
    """A device profile file or name is invalid; `field` is `device.<key>`."""


class SourceKind(enum.Enum):
    DATASHEET = "datasheet"
    PUBLISHED = "published"
    """Taken from one published measurement."""
    FIT = "fit"
    """Fitted to published measurements (the rows are named)."""
    MEASURED = "measured"
    """Measured by `pyengine calibrate` on this engine's kernels (the profile's provenance says where)."""
    FILE = "file"
    """Set by a profile file that does not say where the number came from."""
    ASSUMPTION = "assumption"
    """Nothing measured or published backs it; the reason is given."""


@dataclass(frozen=True, slots=True)
class Source:
    kind: SourceKind
    ref: str
    """The exact reference: document and row, or the file, or why it is assumed."""

    def __str__(self) -> str:
        return f"{self.kind.value}: {self.ref}"

    def to_dict(self) -> dict:
        return {"kind": self.kind.value, "ref": self.ref}


UNCALIBRATED = Source(SourceKind.ASSUMPTION, "default: the planner's uncalibrated assumption")


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
    """NVLink line rate between two GPUs, per direction, GB/s."""
    nvlink_latency_us: float
    """Latency of one small point-to-point message on NVLink (NCCL send/recv), microseconds."""
    pcie_gb_s: float
    """PCIe line rate per direction, GB/s."""
    pcie_latency_us: float
    """Latency of one small point-to-point message over PCIe, microseconds."""
    hbm_efficiency: float = 0.8
    """HBM streaming efficiency: the fraction of hbm_gb_s a kernel streaming its operands reaches."""
    link_efficiency: float = 0.8
    """Link efficiency: NCCL's ring bus bandwidth over the line rate (NVLink and PCIe alike)."""
    gemm_efficiency: float = 0.7
    """Dense GEMM efficiency at large M: the fraction of peak FLOP/s cuBLAS-class GEMMs reach."""
    gemm_half_rows: float = 0.0
    """M at which a dense GEMM reaches half of gemm_efficiency (0: efficiency does not depend on M)."""
    grouped_gemm_efficiency: float = 0.7
    """Grouped expert GEMM efficiency with many rows per expert."""
    grouped_gemm_half_rows: float = 0.0
    """Rows per touched expert at which a grouped GEMM reaches half of grouped_gemm_efficiency
    (tile occupancy: few rows per expert leave most of each tile and each wave empty)."""
    collective_base_us: float = 0.0
    """Fixed latency of one collective (launch and synchronisation), microseconds."""
    collective_step_us: float = 3.0
    """Latency added per ring step of a collective, microseconds."""
    kernel_launch_us: float = 4.0
    """Fixed cost of every kernel (launch, ramp and tail): dominates at tiny shapes."""
    reserved_gb: float = 1.0
    """Memory not available to the model: CUDA context, NCCL buffers, allocator slack."""
    host_launch_us: float = 5.0
    """Host time to issue one kernel (eager): what a decode step's launches cost the CPU."""
    action_host_us: float = 25.0
    """Host time of the runtime's own work per schedule action (its Python, events, transport call)."""
    graph_replay_us: float = 5.0
    """Host time to issue one captured CUDA graph (one per compute action of a graphed decode step)."""
    sources: dict[str, Source] = field(default_factory=dict, compare=False)
    """Where each number comes from, by field name (a field missing here is UNCALIBRATED)."""
    provenance: dict[str, str] = field(default_factory=dict, compare=False)
    """For a measured profile: machine, date, commit and command of the measurement."""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise DeviceProfileError("device.name", self.name, "must be a non-empty string")
        for f in number_fields():
            v = getattr(self, f)
            check_number(f"device.{f}", v, error=DeviceProfileError)  # finite: no NaN/Inf
            if f.endswith(("_us", "_rows")) or f == "reserved_gb":
                if v < 0:
                    raise DeviceProfileError(f"device.{f}", v, "must be >= 0")
            elif f.endswith("efficiency"):
                if not 0 < v <= 1:
                    raise DeviceProfileError(f"device.{f}", v, "must be in (0, 1]")
            elif v <= 0:
                raise DeviceProfileError(f"device.{f}", v, "must be > 0")
        unknown = sorted(set(self.sources) - set(number_fields()))
        if unknown:
            raise DeviceProfileError(f"device.sources.{unknown[0]}", self.sources[unknown[0]],
                                     "names no number of the profile")

    def source(self, name: str) -> Source:
        return self.sources.get(name, UNCALIBRATED)

    # ---- achievable rates ------------------------------------------------------------
    def peak_flops_per_s(self, dtype: str) -> float:
        peak = {"bfloat16": self.peak_tflops_bf16, "float16": self.peak_tflops_fp16,
                "float32": self.peak_tflops_fp32}[dtype]
        return peak * 1e12

    def efficiency(self, kind: KernelKind, rows: float | None) -> float:
        """Fraction of peak FLOP/s a GEMM of this kind and rows reaches (see the module docstring)."""
        if kind is KernelKind.GROUPED:
            plateau, half = self.grouped_gemm_efficiency, self.grouped_gemm_half_rows
        else:
            plateau, half = self.gemm_efficiency, self.gemm_half_rows
        if half == 0 or rows is None:
            return plateau
        return plateau * rows / (rows + half)

    def hbm_bytes_per_s(self) -> float:
        return self.hbm_gb_s * 1e9 * self.hbm_efficiency

    def link(self, interconnect: str) -> tuple[float, float]:
        """(achievable bytes/s per direction, point-to-point latency in s) of one GPU-to-GPU link."""
        if interconnect == "nvlink":
            return self.nvlink_gb_s * 1e9 * self.link_efficiency, self.nvlink_latency_us * 1e-6
        if interconnect == "pcie":
            return self.pcie_gb_s * 1e9 * self.link_efficiency, self.pcie_latency_us * 1e-6
        raise ValueError(f"interconnect = {interconnect!r}: must be 'nvlink' or 'pcie'")

    # ---- op times ----------------------------------------------------------------------
    def kernel_s(self, k: KernelCost, dtype: str) -> float:
        """One kernel: bound by math or by memory traffic, whichever is slower, plus the launch."""
        memory = k.hbm_bytes / self.hbm_bytes_per_s()
        compute = 0.0
        if k.kind is not KernelKind.MEMORY and k.flops > 0:
            compute = k.flops / (self.peak_flops_per_s(dtype) * self.efficiency(k.kind, k.rows))
        return self.kernel_launch_us * 1e-6 + max(compute, memory)

    def transfer_s(self, nbytes: float, interconnect: str) -> float:
        """One point-to-point message."""
        bw, lat = self.link(interconnect)
        return lat + nbytes / bw

    def collective_s(self, collective: Collective, nbytes: float, n: int, interconnect: str) -> float:
        """Ring `collective` of an `nbytes` buffer over n GPUs: a fixed latency, a latency per
        ring step, and its bus factor times the bytes over one link (all-reduce: 2(n-1) steps,
        bus factor 2(n-1)/n)."""
        if n <= 1:
            return 0.0
        bw, _ = self.link(interconnect)
        latency_us = self.collective_base_us + collective.ring_steps(n) * self.collective_step_us
        return latency_us * 1e-6 + collective.bus_factor(n) * nbytes / bw

    def with_values(self, **values: float) -> DeviceProfile:
        """This profile with some numbers replaced (their sources kept: callers that fit set them)."""
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.name not in ("sources", "provenance")}
        out["sources"] = {k: self.source(k).to_dict() for k in number_fields()}
        if self.provenance:
            out["provenance"] = dict(self.provenance)
        return out


def number_fields() -> tuple[str, ...]:
    """The profile's numbers, in declaration order (everything but name, sources, provenance)."""
    return _NUMBERS


_NUMBERS = tuple(f.name for f in dataclasses.fields(DeviceProfile)
                 if f.name not in ("name", "sources", "provenance"))
