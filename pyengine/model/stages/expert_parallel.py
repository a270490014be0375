"""Stage 1, expert parallel: each GPU holds whole experts and computes only the tokens routed to them.

The router's GPU knows where every token goes, so it sends each expert GPU only its tokens
(`Payload.DISPATCH`: the tokens with at least one chosen expert there, once each, with the
local expert id and router weight of every slot, -1 for a slot held elsewhere); an expert GPU runs
the same Triton kernels as tensor parallelism on its rows, the -1 slots left out by the kernels'
alignment on the device (no host sync), each token's choices summed in fp32 in a fixed order, and
returns one row per token
(`Payload.COMBINE`), which the output stage scatter-adds into the residual. Experts on the
router's own GPU read the router's tensors directly: no copy, no message.

With parallel.dense_mlp_placement "experts" every expert GPU (the router's own included) also holds
a near-even share of the columns of the shared expert and of the dense layers' MLP (tensor
parallelism of those parts over the stage's GPUs, pyengine.model.stages.expert_mlps): it then
receives every token of the layer (the router's GPU sends each GPU all rows, its choices held
elsewhere as -1, as a static step does), adds its MLP partial to its experts' sum per token, and the
combine sums the GPUs' rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyengine.model.batch import Chunk
from pyengine.model.expert_act import ExpertActivation
from pyengine.model.payloads import Payload, PerRank
from pyengine.model.routing import Routing, uniform
from pyengine.model.stages.base import Inputs, KernelCost, Shard, Source, Stage, StageKind, Work
from pyengine.model.stages.expert_mlps import ExpertMLPs
from pyengine.model.stages.experts import expert_shapes


class ExpertParallelStage(ExpertMLPs, Stage):
    kind = StageKind.EXPERTS

    def inputs(self, layer: int | None) -> tuple[Source, ...]:
        return (Source(Payload.DISPATCH, StageKind.EMBED, layer),)

    def __init__(self, spec, routing: Routing | None = None):
        super().__init__(spec)
        self._init_mlps()  # the layers: the MoE ones, and the dense ones when their MLP runs here
        self.routing = routing or uniform(spec)
        self.placement: dict[int, tuple[int, ...]] = dict(zip(self.ranks, spec.expert_placement()))
        self._luts: dict[Any, dict[int, Any]] = {}
        self.act = ExpertActivation.of_model(spec.model)

    # ---- costs (expected values under self.routing) --------------------------------------
    def rows_for(self, rank: int, tokens: int) -> float:
        """Tokens sent to `rank` (those with at least one chosen expert there; every token when the
        dense MLPs run on the expert GPUs)."""
        return tokens if self.mlps else tokens * self.routing.token_share(self.placement[rank])

    def _receives(self, rank: int) -> bool:
        """An expert GPU receives its rows; the router's own GPU reads them from u in place."""
        return rank not in self.spec.stage("embed").gpus

    def pairs_for(self, rank: int, tokens: int) -> float:
        """(token, expert) pairs `rank` computes."""
        return tokens * self.spec.model.top_k * self.routing.pair_share(self.placement[rank])

    def cost_layer(self, layer: int | None) -> int | None:
        return self.mlp_cost_layer(layer)  # the MoE layers' experts cost the same

    def kernels(self, tokens: int, rank: int, layer: int | None = None,
                chunk: Chunk | None = None) -> list[KernelCost]:
        mlp = self.mlp_kernels(tokens, rank, layer)  # every GPU receives every token
        return mlp if self.spec.model.is_dense(layer) else self._routed_kernels(tokens, rank) + mlp

    def _routed_kernels(self, tokens: int, rank: int) -> list[KernelCost]:
        m, es = self.spec.model, self.elem
        h, f, k = m.hidden_size, m.ffn_hidden_size, m.top_k
        rows, pairs = self.rows_for(rank, tokens), self.pairs_for(rank, tokens)
        # expected experts touched (under self.routing) stream their weights once per micro-batch
        hit = self.routing.experts_touched(self.placement[rank], tokens)
        per_expert = pairs / hit if hit else 0.0
        # The router's GPU gathers its tokens' rows from the full u; an expert GPU received them.
        gather = [] if self._receives(rank) else [
            KernelCost.memory("gather_rows", 2 * rows * h * es)]
        bias = m.expert_bias  # gate/up biases added per pair in the epilogue, b_down in the row GEMM's
        return [
            *gather,
            KernelCost.grouped("gate_up_swiglu", 4.0 * pairs * h * f + bias * 2.0 * pairs * f,
                               2 * hit * h * f * es + pairs * h * es + pairs * f * es + bias * 2 * hit * f * es,
                               per_expert),
            KernelCost.grouped("down_rows", 2.0 * pairs * f * h + bias * pairs * h,
                               hit * f * h * es + pairs * f * es + pairs * h * 4 + bias * hit * h * es, per_expert),
            # zeroed per-choice rows (the -1 choices stay zero), summed per token in fp32
            KernelCost.memory("sum_choices", 2 * rows * k * h * 4 + rows * h * es),
        ]

    def weight_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        m = self.spec.model
        return {**expert_shapes(m, len(self.placement[rank]), m.ffn_hidden_size), **self._mlp_shapes(rank)}

    def shard(self, rank: int) -> Shard:
        return Shard(experts=self.placement[rank], **self._mlp_shard(rank))

    def working_set(self, tokens: int, rank: int) -> tuple[int, int]:
        m, es = self.spec.model, self.elem
        h, f, k = m.hidden_size, m.ffn_hidden_size, m.top_k
        rows = self.rows_for(rank, tokens)
        received = self._receives(rank)
        act_in = Payload.DISPATCH.nbytes(self.spec, round(rows)) if received else 0
        out_rows = Payload.COMBINE.nbytes(self.spec, round(rows))
        # The kernels size their buffers by every choice of a row (k per row, -1 ones included):
        # the SwiGLU activations and the fp32 per-choice rows; the router's GPU also gathers u.
        gathered = 0 if received else rows * h * es
        work = act_in + gathered + rows * k * f * es + rows * k * h * 4 + out_rows + self.mlp_working_set(round(rows), rank)
        return int(work), int(act_in + out_rows)

    def part(self, rank: int) -> str:
        return f"experts {_ranges(self.placement[rank])}" + self.mlp_part(rank)

    # ---- compute ---------------------------------------------------------------------------
    def from_router(self, u, top_ids, top_w, static: bool = False) -> dict[Payload, Any]:
        """The router's output packaged for each expert GPU: its tokens only (the router's own
        GPU keeps the full u and reads its rows by token index, without a copy). `static` (a
        decode step): every row to every expert GPU, choices held elsewhere as -1 — a fixed-size
        message, no row counts to bring to the host (at decode the rows are few and the expert
        weights, not the activations, are what moves)."""
        import torch

        embed_rank = self.spec.stage("embed").gpus[0]
        luts = self._lut(u.device)
        ids = top_ids.long()
        # [t, k] local ids; -1: held elsewhere (or a padding row's -1, kept)
        local = {rank: torch.where(ids < 0, -1, lut[ids.clamp(min=0)]) for rank, lut in luts.items()}
        if static or self.mlps:  # the MLP shards need every token on every GPU
            return {Payload.DISPATCH: self._dense(u, local, top_w)}
        sent = torch.stack([(loc >= 0).any(dim=1) for loc in local.values()])  # [ranks, t]
        counts = sent.sum(dim=1).tolist()  # intended sync: every GPU's row count sizes its send
        order = torch.argsort((~sent).to(torch.int8), dim=1, stable=True)  # sent tokens first, in order
        out = PerRank()
        for i, (rank, loc) in enumerate(local.items()):
            idx = order[i, :counts[i]]
            meta = torch.cat([idx.to(torch.int32).unsqueeze(1), loc[idx]], dim=1).contiguous()
            w = torch.where(loc[idx] >= 0, top_w[idx], torch.zeros((), dtype=top_w.dtype, device=u.device))
            out[rank] = (u if rank == embed_rank else u[idx], meta, w.contiguous())
        return {Payload.DISPATCH: out}

    def _dense(self, u, local: dict, top_w) -> PerRank:
        import torch

        token = torch.arange(u.shape[0], device=u.device, dtype=torch.int32).unsqueeze(1)
        out = PerRank()
        for rank, loc in local.items():
            w = torch.where(loc >= 0, top_w, torch.zeros((), dtype=top_w.dtype, device=u.device))
            out[rank] = (u, torch.cat([token, loc], dim=1), w)
        return out

    def _lut(self, device) -> dict[int, Any]:
        """Per expert GPU: global expert id -> local index there (or -1), on `device`."""
        if device not in self._luts:
            import torch

            luts = {}
            for rank, held in self.placement.items():
                lut = torch.full((self.spec.model.num_experts,), -1, dtype=torch.int32)
                lut[list(held)] = torch.arange(len(held), dtype=torch.int32)
                luts[rank] = lut.to(device)
            self._luts[device] = luts
        return self._luts[device]

    def compute(self, weights: Mapping[str, Any], ids: Any, inputs: Inputs,
                work: Work | None = None) -> dict[Payload, tuple]:
        (rows, meta, w), = inputs[Payload.DISPATCH]
        n = meta.shape[0]
        token, local = meta[:, 0], meta[:, 1:]
        # A full u (the router's own GPU) is read by token index; received rows are compact.
        u = rows[token.long()] if rows.shape[0] != n else rows
        # local holds -1 for a choice held by another GPU: the kernels leave it out on the device
        # (no host sync to list this GPU's pairs), and sum each token's own choices in fp32.
        work = work or Work(None, None)
        ops = work.kernels_for(u.device)
        y = self.with_mlp(weights, u, work.layer,
                          lambda: ops.experts(weights, u, local, w, skip_ids=True, static=work.static, act=self.act))
        return {Payload.COMBINE: (y, meta[:, :1].contiguous())}


def _ranges(ids: tuple[int, ...]) -> str:
    """[0, 1, 2, 5] -> '0-2,5' (the module division of an expert GPU)."""
    out, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ",".join(out)
