"""Stage 0 (embed + router): x = embed[ids]; u = rmsnorm(x) * norm_in; top-k routing of u."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyengine.model.payloads import Payload
from pyengine.model.stages.base import Inputs, KernelCost, Stage, StageKind


class EmbedStage(Stage):
    kind = StageKind.EMBED
    weight_names = ("embed", "norm_in", "router")

    def __init__(self, spec, consumer: Stage):
        super().__init__(spec)
        self.consumer = consumer
        """The experts stage: it says how the router's output is packaged for it."""

    def kernels(self, tokens: int, rank: int) -> list[KernelCost]:
        m, es, t = self.spec.model, self.elem, tokens
        h, e, k = m.hidden_size, m.num_experts, m.top_k
        return [
            KernelCost("embed_gather", 0.0, t * 8 + 2 * t * h * es),
            KernelCost("rmsnorm_in", 0.0, 2 * t * h * es + h * es),
            KernelCost("router_gemm", 2.0 * t * h * e, t * h * es + h * e * es + t * e * 4),
            KernelCost("softmax_topk", 0.0, t * e * 4 + t * k * 8),
        ]

    def weight_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        m = self.spec.model
        return {"embed": (m.vocab_size, m.hidden_size), "norm_in": (m.hidden_size,),
                "router": (m.hidden_size, m.num_experts)}

    def working_set(self, tokens: int, rank: int) -> tuple[int, int]:
        m, es, t = self.spec.model, self.elem, tokens
        work = 2 * t * m.hidden_size * es + t * m.num_experts * 4 + t * m.top_k * 8  # x, u, logits, top-k
        keeps_x = rank in self.spec.stage("output").gpus  # x waits here for the residual add
        return work, (t * m.hidden_size * es if keeps_x else 0)

    def part(self, rank: int) -> str:
        return "embed+router"

    def compute(self, weights: Mapping[str, Any], ids: Any, inputs: Inputs) -> dict[Payload, tuple]:
        x, u, top_ids, top_w = embed_and_route(self.spec, weights, ids)
        return {**self.consumer.from_router(u, top_ids, top_w), Payload.RESID: (x,)}


def embed_and_route(spec, w: Mapping[str, Any], ids):
    """ids [T] -> x [T,H], u [T,H], top-k ids int32 [T,k], top-k weights fp32 [T,k]."""
    from pyengine.model.math import rmsnorm, route

    x = w["embed"][ids]
    u = rmsnorm(x, w["norm_in"], spec.model.norm_eps)
    top_ids, top_w = route(u, w["router"], spec.model.top_k, spec.model.renormalize)
    return x, u, top_ids, top_w
