"""The Triton path of the stages' kernels (pyengine.kernels), prepared once per rank.

Input checks and config selection happen here, at set-up, not per call: the prepared launchers
(`ExpertShard`, `RouterTopK`, `QKRopeCache`, `DecodeAttention`) take the hot path's tensors as the
engine made them and launch, with no host sync and no allocation that could move, so a decode step's
kernels can be captured in a CUDA graph. A decode group's attention: one QKV GEMM, one kernel for
the q/k norm + RoPE + the paged KV write, two for flash-decoding over the cache in place.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

import torch

from pyengine.model.expert_act import SWIGLU
from pyengine.model.kernel_path import KernelPath
from pyengine.model.ops_torch import TorchOps

_INTERPRETER = threading.Lock()
"""Triton's interpreter patches module state while a kernel runs: on CPU the ranks' threads (the
local transport) take turns. Compiled kernels on a GPU need no lock."""

STATIC_ROWS = 256
"""Calls of up to this many rows (a decode bucket) get launchers of their own, whose buffers never
grow (a captured graph points at them); larger ones (a prefill) share one that grows."""


class TritonOps(TorchOps):
    path = KernelPath.TRITON
    graphable = True
    not_graphable = ""

    def __init__(self, spec, device: torch.device):
        self.spec, self.device = spec, device
        self._turns = _INTERPRETER if device.type != "cuda" else contextlib.nullcontext()
        self._shards: dict[tuple, Any] = {}
        self._routers: dict[tuple, Any] = {}
        self._attn: dict[tuple, Any] = {}
        self._ropes: dict[tuple, Any] = {}

    # ---- residual + norm, router, experts -----------------------------------------------------
    def residual_norm(self, x, partials, w, eps, keep_residual=True):
        from pyengine.kernels.residual_rmsnorm import fused_residual_rmsnorm

        with self._turns:
            if keep_residual:
                return fused_residual_rmsnorm(x, partials, w, eps, return_residual=True)
            return None, fused_residual_rmsnorm(x, partials, w, eps)

    def norm(self, x, w, eps):
        from pyengine.kernels.residual_rmsnorm import fused_rmsnorm

        with self._turns:
            return fused_rmsnorm(x, w, eps)

    def route(self, u, router, k, renormalize, grouped=None, correction=None, bias=None):
        """The router GEMM (cuBLAS), then softmax + top-k + renormalise in one kernel (ties to the
        lower expert id). With `grouped`: the GEMM in fp32 (the gate is kept in fp32), then the
        kernel's sigmoid_grouped variant; a router past the kernel's limits (more than 256 experts
        or top-k above 8) takes the torch path instead (same rule, same ties). `bias` (gpt-oss): in
        the GEMM (addmm)."""
        from pyengine.kernels.router_topk import MAX_EXPERTS, MAX_TOP_K, RouterTopK

        e = router.shape[1]
        if grouped is not None and (e > MAX_EXPERTS or k > MAX_TOP_K):
            return super().route(u, router, k, renormalize, grouped, correction)
        key = (e, k, renormalize, grouped)
        if key not in self._routers:
            extra = {} if grouped is None else dict(
                variant="sigmoid_grouped", n_group=grouped.n_group, topk_group=grouped.topk_group,
                routed_scaling_factor=grouped.routed_scaling_factor)
            self._routers[key] = RouterTopK(e, k, self.device, **{"variant": "softmax", "renormalize": renormalize,
                                                                  **extra})
        if grouped is not None:
            logits = u.float() @ router.float()
        else:
            logits = u @ router if bias is None else torch.addmm(bias, u, router)
        with self._turns:
            return self._routers[key](logits, correction_bias=None if correction is None else correction.float())

    def experts(self, w: Mapping[str, Any], u, ids, weights, skip_ids=False, static=False, act=SWIGLU):
        """align + column GEMM (SwiGLU, or `act`'s clamped one; biases in the epilogues) + row GEMM
        + the fixed-order k-sum: four launches. Ids of -1 (held elsewhere, or a padding row) add
        nothing."""
        shard = self._shard(w, u, act)
        biases = {"b_gate": w["b_gate"], "b_up": w["b_up"], "b_down": w["b_down"]} if act.bias else {}
        with self._turns:
            return shard(u, w["w_gate"], w["w_up"], w["w_down"], ids.contiguous(), weights.contiguous(), **biases)

    def _shard(self, w, u, act):
        from pyengine.kernels.moe_expert_shard import ExpertShard

        E, H, F = w["w_up"].shape
        rows = u.shape[0] if u.shape[0] <= STATIC_ROWS else None
        key = (E, H, F, u.dtype, rows, act)
        if key not in self._shards:  # the activation is the shard's, fixed here (a kernel option)
            shard = ExpertShard(E, H, F, self.spec.model.top_k, u.dtype, self.device, skip_ids=True,
                                activation=act.kernel, bias=act.bias, alpha=act.alpha, limit=act.limit)
            if rows is not None:
                shard.reserve(rows)
            self._shards[key] = shard
        return self._shards[key]

    # ---- attention ------------------------------------------------------------------------------
    def decode_tables(self, cache, rope, meta: torch.Tensor, dtype: torch.dtype, key_blocks: int):
        """A static decode group's tables: views of its rows' metadata, nothing computed (the
        kernels read positions, slots and lengths themselves)."""
        from pyengine.model.attention import ChunkTables

        return ChunkTables(meta[0], meta[1], meta[2], None, None, None, rope, True, key_blocks)

    def attention(self, model, w, a, cache, layer, chunk, tables):
        from pyengine.model.attention import attend_prefill, attention_torch, project_qkv, sink_and_window

        if model.mla is not None:
            return self._mla_attention(model, w, a, cache, layer, chunk, tables)
        if cache.is_ring(layer) and not tables.decode:  # reads the ring before writing it: torch
            return attention_torch(model, w, a, cache, layer, chunk, tables)

        qkv = project_qkv(model, w, a)
        q = torch.empty(a.shape[0], model.heads, model.head_size, dtype=a.dtype, device=a.device)
        kc, vc = cache.layer_views(layer)
        table = cache.table(layer)
        norms = {"q_norm_w": w["q_norm"], "k_norm_w": w["k_norm"]} if model.qk_norm != "none" else {}
        with self._turns:
            self._rope(model, cache.block_size, a.dtype)(qkv, tables.positions, tables.slots, table, kc, vc,
                                       tables.rope.cos_half, tables.rope.sin_half, q, eps=model.norm_eps,
                                       **norms)
            if tables.decode:  # a sliding layer's split kernel reads only its window's blocks
                out = torch.empty_like(q)
                self._decode_attention(model, cache, q.shape[0], a.dtype, table.shape[1])(
                    q, kc, vc, table, tables.slots, tables.lengths, out,
                    **sink_and_window(model, w, layer))
                return out.reshape(q.shape[0], -1)
        return attend_prefill(cache, layer, chunk, q, tables, **sink_and_window(model, w, layer))

    def _mla_attention(self, model, w, a, cache, layer, chunk, tables):
        """MLA: the projections (GEMMs), then one kernel turning q's rotary part, norming the latent,
        turning the shared key and writing [latent | key] into the cache; a decode group reads the
        latent in place (absorbed, one Triton split-K kernel + combine), a prefill decompresses its
        sequence's latents (torch)."""
        from pyengine.model import attention_mla as mla

        m = model.mla
        q_in = mla.project_q(model, w, a, norm=self.norm)
        q = torch.empty_like(q_in)
        latent = cache.layer_views(layer)[0]
        with self._turns:
            self._mla_rope(model, cache.block_size, a.dtype)(
                q_in, a @ w["wkv_a"], tables.positions, tables.slots, cache.block_table, latent,
                tables.rope.cos_half, tables.rope.sin_half, w["kv_a_norm"], q, eps=mla.LATENT_NORM_EPS)
        if not tables.decode:
            return mla.mla_attend_prefill(model, w, cache, layer, chunk, q, tables)
        out = torch.empty(q.shape[0], model.heads, m.kv_lora_rank, dtype=a.dtype, device=a.device)
        with self._turns:
            self._decode_mla(model, cache, q.shape[0], a.dtype)(
                mla.absorb_q(model, w, q), latent, cache.block_table, tables.slots,
                tables.lengths, out, scale=mla.softmax_scale(model))
        return mla.unabsorb_out(model, w, out)

    def _mla_rope(self, model, block_size: int, dtype):
        from pyengine.kernels.mla_rope_cache import MLARopeCache

        key = ("mla", block_size, dtype)
        if key not in self._ropes:  # rows are a launch's grid only: any count
            m = model.mla
            self._ropes[key] = MLARopeCache(model.heads, m.qk_nope_head_dim, m.qk_rope_head_dim, m.kv_lora_rank,
                                            block_size, dtype, self.device)
        return self._ropes[key]

    def _decode_mla(self, model, cache, rows: int, dtype):
        from pyengine.kernels.decode_attention_mla import DecodeMLA

        cap = rows if rows <= STATIC_ROWS else -(-rows // STATIC_ROWS) * STATIC_ROWS
        key = ("mla", cap, cache.block_size, cache.max_blocks)
        if key not in self._attn:
            self._attn[key] = DecodeMLA(cap, model.heads, model.mla.kv_lora_rank, model.mla.qk_rope_head_dim,
                                        cache.block_size, cache.max_blocks, dtype, self.device)
        return self._attn[key]

    def _rope(self, model, block_size: int, dtype):
        from pyengine.kernels.qk_rope_cache import QKRopeCache

        key = (block_size, dtype)
        if key not in self._ropes:  # rows are a launch's grid only: any count
            self._ropes[key] = QKRopeCache(1, model.heads, model.kv_heads, model.head_size, block_size,
                                           dtype, self.device, qk_norm=model.qk_norm)
        return self._ropes[key]

    def _decode_attention(self, model, cache, rows: int, dtype, table_blocks: int):
        """`table_blocks`: the table's width, which bounds the keys a split reads (a ring's: the window's)."""
        from pyengine.kernels.decode_attention import DecodeAttention

        cap = rows if rows <= STATIC_ROWS else -(-rows // STATIC_ROWS) * STATIC_ROWS
        key = (cap, cache.block_size, table_blocks)
        if key not in self._attn:
            self._attn[key] = DecodeAttention(cap, model.heads, model.kv_heads, model.head_size,
                                              cache.block_size, table_blocks, dtype, self.device)
        return self._attn[key]

