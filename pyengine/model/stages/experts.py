"""Stage 1 (experts, tensor-parallel): each rank holds columns F_r of every expert and computes
its partial y_r = sum over chosen (e, w) of w * (silu(u @ w_gate[e]) * (u @ w_up[e])) @ w_down[e]
(gpt-oss: the clamped SwiGLU and the biases, pyengine.model.expert_act; b_gate, b_up sliced with F's
columns, b_down on the shard of F's first column only, so the partials add up to one bias).

With parallel.dense_mlp_placement "experts" it also holds its columns of the shared expert and of
the dense layers' MLP and adds their partial to y_r (pyengine.model.stages.expert_mlps).

The rank's ops run it (pyengine.model.ops): the Triton kernels of pyengine.kernels on the Triton path
(the default on CUDA), the same math in torch on the torch path."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyengine.model.batch import Chunk
from pyengine.model.expert_act import ExpertActivation
from pyengine.model.payloads import Payload
from pyengine.model.stages.base import Inputs, KernelCost, Shard, Source, Stage, StageKind, Work
from pyengine.model.stages.expert_mlps import ExpertMLPs
from pyengine.model.tensors import expert_names


def expert_shapes(model, experts: int, f: int) -> dict[str, tuple[int, ...]]:
    """The shapes of `experts` experts' tensors with `f` columns of F (biases with model.expert_bias)."""
    h = model.hidden_size
    shapes = {"w_gate": (experts, h, f), "w_up": (experts, h, f), "w_down": (experts, f, h),
              "b_gate": (experts, f), "b_up": (experts, f), "b_down": (experts, h)}
    return {n: shapes[n] for n in expert_names(model)}


class ExpertsStage(ExpertMLPs, Stage):
    kind = StageKind.EXPERTS

    def inputs(self, layer: int | None) -> tuple[Source, ...]:
        return (Source(Payload.ACT, StageKind.EMBED, layer),)

    def __init__(self, spec):
        super().__init__(spec)
        self._init_mlps()  # the layers: the MoE ones, and the dense ones when their MLP runs here
        self._cols = {rank: (a, b) for rank, a, b in spec.ffn_shards()}
        self.act = ExpertActivation.of_model(spec.model)

    def f_cols(self, rank: int) -> int:
        a, b = self._cols[rank]
        return b - a

    def cost_layer(self, layer: int | None) -> int | None:
        return self.mlp_cost_layer(layer)  # the MoE layers' experts cost the same

    def kernels(self, tokens: int, rank: int, layer: int | None = None,
                chunk: Chunk | None = None) -> list[KernelCost]:
        mlp = self.mlp_kernels(tokens, rank, layer)  # every GPU sees every token
        return mlp if self.spec.model.is_dense(layer) else self._routed_kernels(tokens, rank) + mlp

    def _routed_kernels(self, tokens: int, rank: int) -> list[KernelCost]:
        from pyengine.model.routing import uniform

        m, es = self.spec.model, self.elem
        h, e, f = m.hidden_size, m.num_experts, self.f_cols(rank)
        pairs = tokens * m.top_k
        # experts touched (expected, uniform routing): each streams its weights once per micro-batch
        hit = uniform(self.spec).experts_touched(range(e), tokens)
        rows = pairs / hit if hit else 0.0
        bias = m.expert_bias  # gate/up biases added per pair in the epilogue, b_down in the row GEMM's
        return [
            KernelCost.grouped("gate_up_swiglu", 4.0 * pairs * h * f + bias * 2.0 * pairs * f,
                               2 * hit * h * f * es + pairs * h * es + pairs * f * es + bias * 2 * hit * f * es, rows),
            KernelCost.grouped("down_combine", 2.0 * pairs * f * h + bias * pairs * h,
                               hit * f * h * es + pairs * f * es + pairs * h * es + tokens * h * es
                               + bias * hit * h * es, rows),
        ]

    def weight_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        return {**expert_shapes(self.spec.model, self.spec.model.num_experts, self.f_cols(rank)),
                **self._mlp_shapes(rank)}

    def shard(self, rank: int) -> Shard:
        return Shard(f_cols=self._cols[rank], **self._mlp_shard(rank))

    def working_set(self, tokens: int, rank: int) -> tuple[int, int]:
        m, es, t = self.spec.model, self.elem, tokens
        h, k, f = m.hidden_size, m.top_k, self.f_cols(rank)
        act_in = Payload.ACT.nbytes(self.spec, t) if rank not in self.spec.stage("embed").gpus else 0
        work = act_in + 2 * t * k * h * es + t * k * f * es + t * h * es  # sorted rows, down out, SwiGLU out, y_r
        work += self.mlp_working_set(t, rank)
        return work, act_in + t * h * es  # queued input, partial awaiting its reduction / send

    def part(self, rank: int) -> str:
        if len(self.ranks) == 1:
            return "experts" + self.mlp_part(rank)
        a, b = self._cols[rank]
        return f"experts F[{a}:{b}]" + self.mlp_part(rank)

    def from_router(self, u, top_ids, top_w, static: bool = False) -> dict[Payload, Any]:
        """The router's output packaged for this stage: every shard needs every token."""
        return {Payload.ACT: (u, top_ids, top_w)}

    def compute(self, weights: Mapping[str, Any], ids: Any, inputs: Inputs,
                work: Work | None = None) -> dict[Payload, tuple]:
        (u, top_ids, top_w), = inputs[Payload.ACT]
        work = work or Work(None, None)
        ops = work.kernels_for(u.device)
        # a static step's padding rows carry expert id -1: left out like a choice held elsewhere
        y = self.with_mlp(weights, u, work.layer, lambda: ops.experts(weights, u, top_ids, top_w, skip_ids=work.static,
                                                                      static=work.static, act=self.act))
        return {Payload.PARTIAL: (y,)}
