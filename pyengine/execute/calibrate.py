"""What `pyengine calibrate` times on one GPU, for a device profile of it: HBM copy bandwidth, the
fixed cost of a kernel launch, dense GEMM rates at several M (torch.matmul: cuBLAS), and this
engine's own grouped expert GEMMs (pyengine.kernels.moe_expert_shard's prepared ExpertShard: the
align, the column GEMM with its SwiGLU, the row GEMM and the k-row sum) at several rows per expert.
The host's own costs (a launch, a graph replay, the runtime's work per action) are timed by
pyengine.execute.calibrate_host.

Every call is timed with CUDA events after warm-up (pyengine.execute.timer.median_time: the
median of `iters` calls, each alone between two events), on operands larger than L2 so each
call streams from HBM. Each timed call is returned with the kernels the planner says it launches
(pyengine.model.costs), so the fits (pyengine.predict.calibration) compare like with like. The
links are timed by the comm harness (pyengine.commbench); this module only measures compute.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pyengine.core import dtypes
from pyengine.core.spec import DeploymentSpec
from pyengine.execute.timer import median_time
from pyengine.model.costs import KernelCost
from pyengine.model.stages import StageKind, stages_of

TimedCall = tuple[tuple[KernelCost, ...], float]
"""(the kernels of one call, its median seconds)."""


@dataclass(frozen=True)
class Sizes:
    """What is timed. The defaults fit an H100/H200 in about a minute and keep every operand
    above the 50 MB L2."""

    copy_bytes: tuple[int, ...] = (1 << 28, 1 << 29, 1 << 30)
    """Bytes of each copied buffer (the copy reads and writes each byte once)."""
    launches: int = 500
    """Tiny kernels issued back to back per timed burst."""
    dense_rows: tuple[int, ...] = (512, 1024, 2048, 4096, 8192)
    """M of the dense GEMMs [M, K] @ [K, N]."""
    dense_nk: int = 8192
    """N = K of the dense GEMMs (a 128 MiB bf16 weight)."""
    grouped_tokens: tuple[int, ...] = (64, 256, 512, 1024, 2048, 4096)
    """Tokens of the expert shard calls (seed: t k / E = t / 4 rows per expert)."""
    iters: int = 20
    warmup: int = 3


@dataclass
class ComputeMeasurements:
    gpu: str
    dtype: str
    copy: list[tuple[float, float]] = field(default_factory=list)
    """(bytes read + written, seconds) per copy size."""
    launch_s: float = 0.0
    """Seconds per tiny kernel issued back to back (launch, ramp and tail)."""
    dense: list[TimedCall] = field(default_factory=list)
    grouped: list[TimedCall] = field(default_factory=list)


def measure_compute(spec: DeploymentSpec, device: torch.device, sizes: Sizes = Sizes()) -> ComputeMeasurements:
    """Every compute measurement on `device`, in the spec's dtype; the grouped calls at the shard
    shape of the spec's first expert GPU (tensor-parallel specs only)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({device})"
    out = ComputeMeasurements(gpu=name, dtype=spec.model.dtype)
    out.copy = measure_copy(device, sizes)
    out.launch_s = measure_launch(device, sizes)
    out.dense = measure_dense(device, spec.model.dtype, sizes)
    out.grouped = measure_grouped(spec, device, sizes)
    return out


def measure_copy(device: torch.device, sizes: Sizes) -> list[tuple[float, float]]:
    out = []
    for nbytes in sizes.copy_bytes:
        src = torch.ones(nbytes, dtype=torch.uint8, device=device)
        dst = torch.empty_like(src)
        out.append((2.0 * nbytes, median_time(lambda: dst.copy_(src), device, sizes.iters, sizes.warmup)))
    return out


def measure_launch(device: torch.device, sizes: Sizes) -> float:
    """A 1-element add issued `launches` times back to back: what a tiny kernel costs in a stream."""
    x = torch.zeros(1, device=device)

    def burst() -> None:
        for _ in range(sizes.launches):
            x.add_(1.0)

    return median_time(burst, device, max(3, sizes.iters // 4), sizes.warmup) / sizes.launches


def measure_dense(device: torch.device, dtype_name: str, sizes: Sizes) -> list[TimedCall]:
    nk, elem, dtype = sizes.dense_nk, dtypes.nbytes(dtype_name), dtypes.torch_dtype(dtype_name)
    g = torch.Generator(device=device).manual_seed(0)
    b = torch.randn(nk, nk, device=device, dtype=dtype, generator=g)
    out = []
    for m in sizes.dense_rows:
        a = torch.randn(m, nk, device=device, dtype=dtype, generator=g)
        c = torch.empty(m, nk, device=device, dtype=dtype)
        seconds = median_time(lambda: torch.matmul(a, b, out=c), device, sizes.iters, sizes.warmup)
        out.append(((KernelCost.gemm("dense_gemm", m, nk, nk, elem),), seconds))
    return out


def measure_grouped(spec: DeploymentSpec, device: torch.device, sizes: Sizes) -> list[TimedCall]:
    """moe_expert_shard at the shard of the spec's first expert GPU, routing uniformly at random
    (each token a random k-subset of the E experts: what the planner's expected counts assume)."""
    from pyengine.kernels.moe_expert_shard import ExpertShard

    if spec.expert_parallel:
        raise ValueError("measure_grouped: times the tensor-parallel shard; the spec is expert-parallel")
    stage = stages_of(spec)[StageKind.EXPERTS]
    rank = stage.ranks[0]
    m, f = spec.model, stage.f_cols(rank)
    dtype = dtypes.torch_dtype(m.dtype)
    g = torch.Generator(device=device).manual_seed(0)
    w_gate, w_up = (torch.randn(m.num_experts, m.hidden_size, f, device=device, dtype=dtype, generator=g)
                    / m.hidden_size ** 0.5 for _ in range(2))
    w_down = torch.randn(m.num_experts, f, m.hidden_size, device=device, dtype=dtype, generator=g) / f ** 0.5
    shard = ExpertShard(m.num_experts, m.hidden_size, f, m.top_k, dtype, device)  # checks once
    out = []
    for t in sizes.grouped_tokens:
        u = torch.randn(t, m.hidden_size, device=device, dtype=dtype, generator=g)
        ids = torch.rand(t, m.num_experts, device=device, generator=g).argsort(dim=1)[:, :m.top_k].int()
        w = torch.softmax(torch.randn(t, m.top_k, device=device, generator=g), dim=1)

        def call() -> None:
            shard(u, w_gate, w_up, w_down, ids, w)

        out.append((tuple(stage.kernels(t, rank)), median_time(call, device, sizes.iters, sizes.warmup)))
    return out
