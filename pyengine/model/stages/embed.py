"""Stage 0, on the attention GPU: per layer, the residual stream's attention and the router.

The block (no layers): x = embed[ids]; u = rmsnorm(x) * norm_in; top-k routing of u.
A model of L layers, at layer l: x = embed[ids] (l = 0) or x = x_{l-1} + the experts' sum of layer
l-1 (the hand-off of the previous layer, added in one fused residual + norm kernel on CUDA);
x = x + attention_l(x) over the KV cache; u = rmsnorm(x) * norm_in_l; top-k routing of u. It
sends u (and the routing) to layer l's experts and keeps x for layer l+1 (or the output head).
A layer's shared expert and a dense layer's MLP join x here, or (parallel.dense_mlp_placement
"experts") run on the expert GPUs: then a dense layer sends u with an empty routing (expert ids -1)
and the next layer takes the hand-off as after a MoE layer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pyengine.model.batch import Batch, Chunk
from pyengine.model.boundaries import boundary_of
from pyengine.model.kv_cache import cache_bytes
from pyengine.model.payloads import Payload
from pyengine.model.costs import KernelKind
from pyengine.model.dense_mlp import dense_layer_mlp, shared_expert
from pyengine.model.stages.base import Inputs, KernelCost, Source, Stage, StageKind, Work
from pyengine.model.tensors import (DENSE_MLP, ROUTER_CORRECTION, attention_names, router_names,
                                    shared_expert_names)


class EmbedStage(Stage):
    kind = StageKind.EMBED
    shared_weights = ("embed",)

    def __init__(self, spec, consumer: Stage):
        super().__init__(spec)
        self.consumer = consumer
        """The experts stage: it says how the router's output is packaged for it."""
        self.boundary = boundary_of(spec)
        self._batch = Batch.of_spec(spec)
        self.attends = spec.model.layered
        self.mlps = not spec.mlps_on_experts
        """The shared expert and the dense layers' MLP run here."""

    def layer_weights(self) -> tuple[str, ...]:
        """Every per-layer name (a dense layer holds its MLP, a MoE layer its router; `tensors`)."""
        m = self.spec.model
        return self._names(False) + (DENSE_MLP if m.dense_layers and self.mlps else ())

    def _names(self, dense: bool) -> tuple[str, ...]:
        m = self.spec.model
        if dense:
            return attention_names(m) + ("norm_in",) + (DENSE_MLP if self.mlps else ())
        return attention_names(m) + ("norm_in",) + router_names(m) + (shared_expert_names(m) if self.mlps else ())

    def tensors(self) -> list[tuple[str, int | None]]:
        m = self.spec.model
        return [(n, None) for n in self.shared_weights] + [
            (n, layer) for layer in self.layer_list for n in self._names(m.is_dense(layer))]

    def weight_bytes(self, rank: int) -> dict[str, int]:
        from pyengine.model.tensors import full_shape

        out: dict[str, int] = {}
        for name, _ in self.tensors():
            n = self.elem
            for d in full_shape(self.spec.model, name):
                n *= d
            out[name] = out.get(name, 0) + n
        return out

    def _after_moe(self, layer: int | None) -> bool:
        """Layer `layer` receives the previous layer's experts stage (a MoE layer's, or a dense
        layer's when its MLP runs there)."""
        return self._after_first(layer) and (layer - 1) in self.consumer.layer_list

    def _after_first(self, layer: int | None) -> bool:
        return layer is not None and layer > 0

    def cost_layer(self, layer: int | None) -> int | None:
        m = self.spec.model
        if m.is_dense(layer) or (self._after_first(layer) and m.is_dense(layer - 1)):
            return layer  # a dense layer, or the one after it: priced on its own
        if m.sliding_window is not None:
            return layer  # sliding and full layers read different keys
        return 1 if self._after_first(layer) else layer  # the kernels only ask whether it is the first

    def inputs(self, layer: int | None) -> tuple[Source, ...]:
        return (Source(Payload.RESID, StageKind.EMBED, layer - 1),) if self._after_first(layer) else ()

    def hand_off_from(self, layer: int | None) -> tuple[int | None, ...]:
        return (layer - 1,) if self._after_moe(layer) else ()

    # ---- costs ----------------------------------------------------------------------------------
    def kernels(self, tokens: int, rank: int, layer: int | None = None,
                chunk: Chunk | None = None) -> list[KernelCost]:
        m, es, t = self.spec.model, self.elem, tokens
        h, e, k = m.hidden_size, m.num_experts, m.top_k
        if self._after_moe(layer):
            first = self.boundary.residual_kernels(self.consumer, t, store_residual=True)
        elif self._after_first(layer):  # after a dense layer: x is whole, only the norm
            first = [KernelCost.memory("rmsnorm_attn", 2 * t * h * es + h * es)]
        else:
            first = [KernelCost.memory("embed_gather", t * 8 + 2 * t * h * es)]
            if m.layered:
                first.append(KernelCost.memory("rmsnorm_attn", 2 * t * h * es + h * es))
        attn = self._attention_kernels(t, chunk, m.window(layer)) if m.layered else []
        norm = 3 * t * h * es if m.layered else 2 * t * h * es  # residual add (+ o) and the norm
        if m.is_dense(layer) and not self.mlps:  # its MLP on the expert GPUs: u goes there, routed nowhere
            return first + attn + [KernelCost.memory("rmsnorm_in", norm + h * es),
                                   KernelCost.memory("empty_routing", t * k * 8)]
        if m.is_dense(layer):
            d = m.dense_ffn_size
            return first + attn + [KernelCost.memory("rmsnorm_in", norm + h * es),
                                   KernelCost.gemm("dense_gate_up", t, 2 * d, h, es),
                                   KernelCost.gemm("dense_down", t, h, d, es), KernelCost.memory("dense_add", 3 * t * h * es)]
        s = m.shared_expert_size if self.mlps else 0
        shared = [KernelCost.gemm("shared_gate_up", t, 2 * s, h, es), KernelCost.gemm("shared_down", t, h, s, es),
                  KernelCost.memory("shared_add", 3 * t * h * es)] if s else []
        if s and m.shared_expert_gate:  # its per-token weight: a GEMV, then sigmoid and scale (read, write)
            shared += [KernelCost.gemm("shared_scale_gemv", t, 1, h, es),
                       KernelCost.memory("shared_scale", 2 * t * h * es + t * es)]
        return first + attn + [
            KernelCost.memory("rmsnorm_in", norm + h * es),
            KernelCost("router_gemm", 2.0 * t * h * e + m.router_bias * t * e,
                       t * h * es + h * e * es + t * e * 4 + m.router_bias * e * es, KernelKind.GEMM, t),
            KernelCost.memory("softmax_topk", t * e * 4 + t * k * 8),
        ] + shared

    def _attention_kernels(self, t: int, chunk: Chunk | None, window: int = 0) -> list[KernelCost]:
        """QKV and O projections (dense GEMMs of t rows), q/k norms + RoPE and the KV-cache write
        (memory-bound), and causal attention over the cached keys: 4*d FLOPs per query-key pair
        and head (QK^T and PV), every cached key and value read once per segment (a sliding layer:
        its window's; the sinks, one logit per head, with the queries)."""
        m, es = self.spec.model, self.elem
        h, d = m.hidden_size, m.head_size
        q, kv = m.heads * d, m.kv_heads * d
        attended, keys = self._attention_work(t, chunk, window)
        if m.mla is not None:
            from pyengine.model.mla_costs import mla_kernels

            decode = chunk is not None and all(s.tokens == 1 for s in chunk.segments) and len(chunk.segments) > 1
            return mla_kernels(m, t, attended, keys, es, decode)
        qkv, o = KernelCost.gemm("qkv_gemm", t, q + 2 * kv, h, es), KernelCost.gemm("o_gemm", t, h, q, es)
        if "q" in m.biased:  # the bias, added in the GEMM's epilogue: read once
            qkv = qkv._replace(hbm_bytes=qkv.hbm_bytes + (q + 2 * kv) * es)
        if "o" in m.biased:
            o = o._replace(hbm_bytes=o.hbm_bytes + h * es)
        return [
            qkv,
            KernelCost.memory("qk_norm_rope_kv_write", 2 * t * (q + kv) * es + 2 * t * kv * es),
            KernelCost("attention", 4.0 * m.heads * d * attended,
                       2 * t * q * es + 2 * keys * kv * es + m.attention_sinks * m.heads * es, KernelKind.GEMM, t),
            o,
        ]

    def _attention_work(self, t: int, chunk: Chunk | None, window: int = 0) -> tuple[float, float]:
        """(query-key pairs, cached key rows read) of a chunk whose queries see at most `window`
        keys (0: all); without one, t tokens' average share of the spec's batch."""
        if chunk is not None:
            return chunk.work_in(window)
        b = self._batch
        share = t / b.tokens
        work = [c.work_in(window) for c in b.chunks]
        return share * sum(a for a, _ in work), share * sum(k for _, k in work)

    # ---- memory ---------------------------------------------------------------------------------
    def weight_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        from pyengine.model.tensors import full_shape

        return {n: full_shape(self.spec.model, n) for n in self.weight_names}

    def working_set(self, tokens: int, rank: int) -> tuple[int, int]:
        m, es, t = self.spec.model, self.elem, tokens
        work = 2 * t * m.hidden_size * es + t * m.num_experts * 4 + t * m.top_k * 8  # x, u, logits, top-k
        if m.layered and m.mla is not None:
            from pyengine.model.mla_costs import mla_working_set

            work += mla_working_set(m, t, es)
        elif m.layered:  # a (H), q and the attention output (heads·d each), k and v (kv·d each), partials
            work += t * (m.hidden_size + 2 * m.heads * m.head_size + 2 * m.kv_heads * m.head_size) * es
            work += int(self.boundary.incoming_bytes(self.consumer, t))
            return work, t * m.hidden_size * es  # x waits here between layers
        keeps_x = rank in self.spec.stage("output").gpus  # x waits here for the residual add
        return work, (t * m.hidden_size * es if keeps_x else 0)

    def state_bytes(self, rank: int, sequences: int, capacity: int) -> int:
        return cache_bytes(self.spec, sequences, capacity)

    def part(self, rank: int) -> str:
        return "embed+attention+router" if self.spec.model.layered else "embed+router"

    # ---- compute --------------------------------------------------------------------------------
    def compute(self, weights: Mapping[str, Any], ids: Any, inputs: Inputs,
                work: Work | None = None) -> dict[Payload, tuple]:
        if not self.spec.model.layered:
            x, u, top_ids, top_w = embed_and_route(self.spec, weights, ids)
        else:
            x, u, top_ids, top_w = self._layer(weights, ids, inputs, work)
            if self.spec.model.is_dense(work.layer):
                return self._dense_out(x, u, work)
        static = work is not None and work.static
        return {**self.consumer.from_router(u, top_ids, top_w, static), Payload.RESID: (x,),
                Payload.ROUTES: (top_ids,)}

    def _dense_out(self, x, u, work: Work) -> dict[Payload, tuple]:
        """A dense layer's payloads: x alone (its MLP already in it), or x and u for the expert GPUs
        that run its MLP, routed to no expert (ids -1, weights 0: the experts' kernels add nothing)."""
        if self.mlps:
            return {Payload.RESID: (x,)}
        import torch

        k = self.spec.model.top_k
        ids = torch.full((u.shape[0], k), -1, dtype=torch.int32, device=u.device)
        none = torch.zeros((u.shape[0], k), dtype=torch.float32, device=u.device)
        return {**self.consumer.from_router(u, ids, none, work.static), Payload.RESID: (x,)}

    def _layer(self, w: Mapping[str, Any], ids, inputs: Inputs, work: Work):
        import torch

        from pyengine.model.attention import linear

        m = self.spec.model
        ops = work.kernels_for(w["norm_in"].device)
        if self._after_moe(work.layer):
            (x,), = inputs[Payload.RESID]
            x, a = ops.residual_norm(x, self.boundary.gather(inputs, x.shape[0]), w["attn_norm"], m.norm_eps)
        elif self._after_first(work.layer):  # after a dense layer (its MLP already in x)
            (x,), = inputs[Payload.RESID]
            a = ops.norm(x, w["attn_norm"], m.norm_eps)
        else:
            x = w["embed"][ids]
            a = ops.norm(x, w["attn_norm"], m.norm_eps)
        o = ops.attention(m, w, a, work.cache, work.layer, work.chunk, work.tables)
        x, u = ops.residual_norm(x, [linear(o, w, "wo", "bo")], w["norm_in"], m.norm_eps)
        if m.is_dense(work.layer):  # no router; the dense MLP joins the residual here (or on the experts)
            return (x + dense_layer_mlp(u, w) if self.mlps else x), u, None, None
        top_ids, top_w = ops.route(u, w["router"], m.top_k, m.renormalize, *_grouped(m, w), **_bias(m, w))
        if m.shared_expert_size and self.mlps:  # the shared expert joins the residual here; the routed ones at hand-off
            x = x + shared_expert(m, u, w)
        if work.static:  # padding rows (slot -1) choose no expert: no expert computes them
            top_ids = torch.where(work.tables.slots[:, None] >= 0, top_ids, -1)
        return x, u, top_ids, top_w


def embed_and_route(spec, w: Mapping[str, Any], ids):
    """ids [T] -> x [T,H], u [T,H], top-k ids int32 [T,k], top-k weights fp32 [T,k]."""
    from pyengine.model.math import rmsnorm, route, route_grouped

    m = spec.model
    x = w["embed"][ids]
    u = rmsnorm(x, w["norm_in"], m.norm_eps)
    if m.grouped_routing is not None:
        top_ids, top_w = route_grouped(u, w["router"], m.top_k, m.renormalize, *_grouped(m, w))
    else:
        top_ids, top_w = route(u, w["router"], m.top_k, m.renormalize, **_bias(m, w))
    return x, u, top_ids, top_w


def _bias(m, w: Mapping[str, Any]) -> dict:
    """The router's own logit bias (gpt-oss), or none."""
    return {"bias": w["router_bias"]} if m.router_bias else {}


def _grouped(m, w: Mapping[str, Any]) -> tuple:
    """The router's extra arguments: (grouped routing, its correction bias), or none."""
    return (m.grouped_routing, w[ROUTER_CORRECTION]) if m.grouped_routing is not None else ()
