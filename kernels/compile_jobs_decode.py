"""Compile jobs of the decode-path kernels: decode attention (paged, split-K), q/k norm + RoPE +
KV-cache write, and the router's top-k, at the shapes a decode step launches them with.

`DecodeShapes` is what one deployment decodes with (attention heads, head dim, KV block size,
positions, the router's E and k, the padded row counts of the CUDA-graph buckets). Launch
arguments are the real values for contiguous tensors, as in compile_jobs, so Triton
specialises them as a real launch would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from pyengine.kernels import decode_attention as attention
from pyengine.kernels import decode_attention_mla as mla
from pyengine.kernels import mla_rope_cache as mla_rope
from pyengine.kernels import qk_rope_cache as rope
from pyengine.kernels import router_topk as router

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Decode rows per step: the CUDA-graph buckets (powers of two up to 256).
DECODE_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
DEFAULT_BLOCK_SIZE = 16  # KV-cache block (keys per page) the engine uses unless told otherwise
SEED_SMS = 132  # the reference Hopper's SM count: split counts as an H100/H200 picks them


@dataclass(frozen=True)
class DecodeShapes:
    """The decode path of one deployment (see pyengine.cli.kernels.decode_shapes_from_spec)."""
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    block_size: int
    max_positions: int
    E: int
    top_k: int
    qk_norm: str = "none"  # none / per_head / full
    router_groups: tuple[int, int] = (1, 1)  # (n_group, topk_group) of a grouped router
    rows: tuple[int, ...] = DECODE_ROWS
    mla: tuple[int, int, int, int] = (16, 512, 64, 128)
    """(heads, kv_lora_rank, qk_rope_head_dim, qk_nope_head_dim) of the MLA kernels; default
    Moonlight-16B-A3B's widths, so they are compiled and their resources checked whatever the
    deployment."""


def decode_jobs(shapes: DecodeShapes, dtype: str, job_type) -> list:
    """Every decode-path job in `dtype` (job_type: compile_jobs.Job, passed in to avoid a cycle)."""
    jobs = []
    for n in shapes.rows:
        jobs += _attention_jobs(shapes, dtype, n, job_type)
    where = [f"rows={n}" for n in shapes.rows]  # grid only: one compile serves every count
    return (jobs + _rope_jobs(shapes, dtype, where, job_type) + _router_jobs(shapes, dtype, where, job_type)
            + _mla_jobs(shapes, dtype, where, job_type))


def _mla_jobs(s: DecodeShapes, dtype: str, where: list[str], Job) -> list:
    """DecodeMLA's split launch (its combine is decode attention's, compiled above): the split
    count is a runtime argument, so one compile serves every row count."""
    heads, latent, rope, nope = s.mla
    ptr = f"*{dtype}"
    cfg = mla.decode_mla_config(latent, rope, heads, torch.device("cuda"))
    width = latent + rope
    args = [ptr, ptr, "*i32", "*i32", "*i32", "*fp32", "*fp32", 2, heads, mla.LOG2E / width ** 0.5,
            heads * width, width, s.block_size * width, width, triton.cdiv(s.max_positions, s.block_size),
            triton.cdiv(s.max_positions, s.block_size)]  # stride_bt, table_width
    meta = dict(C=latent, R=rope, PAGE=s.block_size, DOT_PRECISION="ieee" if dtype == "fp32" else None,
                **{k: cfg[k] for k in ("BLOCK_H", "BLOCK_N", "BLOCK_C", "BLOCK_R")})
    launch = {k: cfg[k] for k in ("num_warps", "num_stages")}
    prep = mla_rope.mla_rope_cache_config(nope, rope, latent)
    prep_args = [ptr, ptr, "*i32", "*i32", "*i32", ptr, "*fp32", "*fp32", ptr, ptr, 1e-6,
                 heads * (nope + rope), nope + rope, width, triton.cdiv(s.max_positions, s.block_size),
                 s.block_size * width, width, heads * (nope + rope), nope + rope]
    prep_meta = dict(HEADS=heads, NOPE=nope, ROPE=rope, LORA=latent, PAGE=s.block_size,
                     **{k: prep[k] for k in ("BLOCK_NOPE", "BLOCK_HALF", "BLOCK_LORA")})
    return [Job("_decode_mla_split_kernel", f"latent={latent} rope={rope}", dtype, launch, "default", args, meta,
                shapes=where),
            Job("_mla_rope_cache_kernel", f"latent={latent} rope={rope} nope={nope}", dtype,
                {"num_warps": prep["num_warps"]}, "implied", prep_args, prep_meta, shapes=where)]


def _rope_jobs(s: DecodeShapes, dtype: str, where: list[str], Job) -> list:
    """QKRopeCache's launch for each norm kind (the deployment's first)."""
    ptr = f"*{dtype}"
    max_blocks = triton.cdiv(s.max_positions, s.block_size)
    kinds = [rope.QKNorm.parse(s.qk_norm)] + [k for k in rope.QKNorm if k != rope.QKNorm.parse(s.qk_norm)]
    jobs = []
    for kind in kinds:
        cfg = rope.qk_rope_cache_config(s.heads, s.kv_heads, s.head_dim, kind)
        norm_ptr = "*fp32" if kind == rope.QKNorm.NONE else ptr  # none: a dummy pointer
        args = [ptr, "*i32", "*i32", "*i32", ptr, ptr, "*fp32", "*fp32", norm_ptr, norm_ptr, ptr,
                1e-6, (s.heads + 2 * s.kv_heads) * s.head_dim, max_blocks, max_blocks,
                s.block_size * s.kv_heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim,
                s.heads * s.head_dim, s.head_dim]
        meta = dict(HEADS=s.heads, KV_HEADS=s.kv_heads, HEAD_DIM=s.head_dim, PAGE=s.block_size,
                    NORM=int(kind), **cfg)
        jobs.append(Job("_qk_rope_cache_kernel", f"qk_norm={kind.name.lower()}", dtype,
                        {"num_warps": cfg["num_warps"]}, "implied", args, meta, shapes=where))
    return jobs


def _router_jobs(s: DecodeShapes, dtype: str, where: list[str], Job) -> list:
    """RouterTopK's launch for each variant at the deployment's E and k (logits in dtype)."""
    jobs = []
    for variant in router.RouterVariant:
        n_group, topk_group = s.router_groups if variant == router.RouterVariant.SIGMOID_GROUPED else (1, 1)
        cfg = router.router_topk_config(s.E, n_group)
        grouped = variant == router.RouterVariant.SIGMOID_GROUPED
        meta = dict(E=s.E, K=s.top_k, VARIANT=int(variant), RENORMALIZE=True, HAS_BIAS=grouped,
                    N_GROUP=n_group, TOPK_GROUP=topk_group, K_PAD=triton.next_power_of_2(s.top_k), **cfg)
        args = [f"*{dtype}", "*fp32", "*i32", "*fp32", s.E, 1.0]
        jobs.append(Job("_router_topk_kernel", f"{variant.name.lower()},groups={n_group}/{topk_group}",
                        dtype, {"num_warps": cfg["num_warps"]}, "implied", args, meta, shapes=where))
    return jobs


def _attention_jobs(s: DecodeShapes, dtype: str, n: int, Job) -> list:
    """The two launches of DecodeAttention at n rows, with and without sinks / a window."""
    ptr = f"*{dtype}"
    max_blocks = triton.cdiv(s.max_positions, s.block_size)
    cfg = attention.decode_attention_config(s.head_dim, s.heads // s.kv_heads, torch.device("cuda"),
                                            DTYPES[dtype])
    splits = attention.split_count(n, s.kv_heads, max_blocks * s.block_size, cfg["BLOCK_N"], SEED_SMS)
    where = [f"rows={n} splits={splits}"]
    scale_log2 = attention.LOG2E / s.head_dim ** 0.5
    kv_strides = [s.block_size * s.kv_heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim]
    split_args = ([ptr, ptr, ptr, "*i32", "*i32", "*i32", "*fp32", "*fp32", splits, 0, scale_log2,
                   s.heads * s.head_dim, s.head_dim, *kv_strides, *kv_strides, max_blocks, max_blocks])
    split_meta = dict(GROUP=s.heads // s.kv_heads, HEAD_DIM=s.head_dim, PAGE=s.block_size,
                      DOT_PRECISION="ieee" if dtype == "fp32" else None, **cfg)
    launch = {k: cfg[k] for k in ("num_warps", "num_stages")}
    jobs = [Job("_decode_attention_split_kernel", f"group={s.heads // s.kv_heads}", dtype,
                launch, "default", split_args, split_meta, shapes=where)]
    for sinks in (False, True):
        args = ["*fp32", "*fp32", "*i32", "*i32", "*fp32", ptr, splits, 0, s.heads,
                s.heads * s.head_dim, s.head_dim]
        combine = attention.combine_config(splits, s.head_dim)
        meta = dict(HEAD_DIM=s.head_dim, HAS_SINKS=sinks, BLOCK_N=cfg["BLOCK_N"], **combine)
        jobs.append(Job("_decode_attention_combine_kernel", f"sinks={sinks}", dtype,
                        {"num_warps": combine["num_warps"]}, "implied", args, meta, shapes=where))
    return jobs
