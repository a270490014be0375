"""Stage 2 (output): h = x + sum of the experts' partial sums; logits = (rmsnorm(h) * norm_out) @ out.

On CUDA the residual add, the partial sums and the norm run as one Triton kernel
(pyengine.kernels.fused_residual_rmsnorm); the output head is one cuBLAS GEMM."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyengine.model.boundaries import boundary_of
from pyengine.model.payloads import Payload
from pyengine.model.stages.base import Inputs, KernelCost, Stage, StageKind


class OutputStage(Stage):
    kind = StageKind.OUTPUT
    weight_names = ("norm_out", "out")
    inputs = ((Payload.RESID, StageKind.EMBED),)

    def __init__(self, spec, experts: Stage):
        super().__init__(spec)
        self.boundary = boundary_of(spec)
        self.experts = experts

    def _partials_read(self) -> int:
        return self.boundary.output_reads(len(self.experts.ranks))

    def kernels(self, tokens: int, rank: int) -> list[KernelCost]:
        m, es, t = self.spec.model, self.elem, tokens
        h, v = m.hidden_size, m.vocab_size
        return self.boundary.output_kernels(self.experts, t) + [
            KernelCost("residual_sum_rmsnorm", 0.0, (2 + self._partials_read()) * t * h * es + h * es),
            KernelCost("out_head_gemm", 2.0 * t * h * v, h * v * es + t * h * es + t * v * es),
        ]

    def weight_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        m = self.spec.model
        return {"norm_out": (m.hidden_size,), "out": (m.hidden_size, m.vocab_size)}

    def working_set(self, tokens: int, rank: int) -> tuple[int, int]:
        m, es, t = self.spec.model, self.elem, tokens
        row = t * m.hidden_size * es
        incoming = int(self.boundary.incoming_bytes(self.experts, t))
        incoming += row if rank not in self.spec.stage("embed").gpus else 0  # x for the residual
        work = incoming + 2 * row + t * m.vocab_size * es  # h, normed h, logits
        return work, incoming + t * m.vocab_size * es  # queued inputs, logits of finished micro-batches

    def part(self, rank: int) -> str:
        return "output head"

    def compute(self, weights: Mapping[str, Any], ids: Any, inputs: Inputs) -> dict[Payload, tuple]:
        (x,), = inputs[Payload.RESID]
        partials = self.boundary.gather(inputs, x.shape[0])
        return {Payload.LOGITS: (output_head(self.spec, weights, x, partials),)}


def output_head(spec, w: Mapping[str, Any], x, partials: list):
    """logits [T, V] from the residual x and the experts' partial sums."""
    eps = spec.model.norm_eps
    if x.device.type == "cuda":
        from pyengine.kernels import fused_residual_rmsnorm

        normed = fused_residual_rmsnorm(x, partials, w["norm_out"], eps)
    else:
        import torch

        from pyengine.model.math import rmsnorm

        y = torch.stack([p.float() for p in partials]).sum(0)
        normed = rmsnorm(x + y.to(x.dtype), w["norm_out"], eps)
    return normed @ w["out"]
