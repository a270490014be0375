"""Stage 2 (output): h = x + sum of the experts' partial sums; logits = (rmsnorm(h) * norm_out) @ out.

On CUDA the residual add, the partial sums and the norm run as one Triton kernel
(pyengine.kernels.fused_residual_rmsnorm); the output head is one cuBLAS GEMM. In a model of
layers it runs once, after the last layer, on that layer's x and hand-off."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyengine.model.batch import Chunk
from pyengine.model.boundaries import boundary_of
from pyengine.model.payloads import Payload
from pyengine.model.stages.base import Inputs, KernelCost, Source, Stage, StageKind, Work


class OutputStage(Stage):
    """After the last layer (the block: its only one): the last hand-off, final norm and head."""

    kind = StageKind.OUTPUT
    shared_weights = ("norm_out", "out")

    def __init__(self, spec, experts: Stage):
        super().__init__(spec)
        self.boundary = boundary_of(spec)
        self.experts = experts

    def layers(self) -> list[int | None]:
        return self.layer_list[-1:]

    def inputs(self, layer: int | None) -> tuple[Source, ...]:
        return (Source(Payload.RESID, StageKind.EMBED, layer),)

    def hand_off_from(self, layer: int | None) -> tuple[int | None, ...]:
        return (layer,)

    def kernels(self, tokens: int, rank: int, layer: int | None = None,
                chunk: Chunk | None = None) -> list[KernelCost]:
        m, es, t = self.spec.model, self.elem, tokens
        h, v = m.hidden_size, m.vocab_size
        return self.boundary.residual_kernels(self.experts, t, store_residual=False) + [
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

    def compute(self, weights: Mapping[str, Any], ids: Any, inputs: Inputs,
                work: Work | None = None) -> dict[Payload, tuple]:
        (x,), = inputs[Payload.RESID]
        partials = self.boundary.gather(inputs, x.shape[0])
        if work is not None and not work.logits_all:  # generation: each sequence's last token only
            rows = list(work.chunk.last_rows)
            if not rows:
                return {Payload.LOGITS: (x.new_empty(0, self.spec.model.vocab_size),)}
            if len(rows) < x.shape[0]:  # a decode group's rows are all last: no gather
                import torch

                # a pageable copy the driver stages (no stream sync), not a host list as the index
                idx = torch.tensor(rows).to(x.device, non_blocking=True)
                x, partials = x.index_select(0, idx), [p.index_select(0, idx) for p in partials]
        ops = (work or Work(None, None)).kernels_for(x.device)
        _, normed = ops.residual_norm(x, partials, weights["norm_out"], self.spec.model.norm_eps,
                                      keep_residual=False)
        return {Payload.LOGITS: (normed @ weights["out"],)}
