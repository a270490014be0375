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
    rows: tuple[int, ...] = DECODE_ROWS


def decode_jobs(shapes: DecodeShapes, dtype: str, job_type) -> list:
    """Every decode-path job in `dtype` (job_type: compile_jobs.Job, passed in to avoid a cycle)."""
    jobs = []
    for n in shapes.rows:
        jobs += _attention_jobs(shapes, dtype, n, job_type)
    return jobs


def _attention_jobs(s: DecodeShapes, dtype: str, n: int, Job) -> list:
    """The two launches of DecodeAttention at n rows, with and without sinks / a window."""
    ptr = f"*{dtype}"
    max_blocks = triton.cdiv(s.max_positions, s.block_size)
    cfg = attention.decode_attention_config(s.head_dim, s.heads // s.kv_heads, torch.device("cuda"))
    splits = attention.split_count(n, s.kv_heads, max_blocks * s.block_size, cfg["BLOCK_N"], SEED_SMS)
    where = [f"rows={n} splits={splits}"]
    scale_log2 = attention.LOG2E / s.head_dim ** 0.5
    kv_strides = [s.block_size * s.kv_heads * s.head_dim, s.kv_heads * s.head_dim, s.head_dim]
    split_args = ([ptr, ptr, ptr, "*i32", "*i32", "*i32", "*fp32", "*fp32", splits, 0, scale_log2,
                   s.heads * s.head_dim, s.head_dim, *kv_strides, *kv_strides, max_blocks])
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
