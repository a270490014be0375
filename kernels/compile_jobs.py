"""What to compile: each Triton kernel with the arguments and configs the engine launches it with.

A deployment's kernel shapes (`Shapes`) and a target (arch + the GPU name whose tuned
files apply) give one `Job` per distinct specialisation: the argument values a launch
passes (Triton specialises ints on ==1 and divisibility by 16, so real values matter),
the constexprs and the config. Configs come from `tuning.pick_config`, the same decision
the runtime makes (env pin > autotune > tuned JSON > default); `all_configs` adds every
autotune candidate, each marked with whether the run-time shared-memory rule keeps it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import triton

from pyengine.core import dtypes
from pyengine.kernels import smem, tuning
from pyengine.kernels.compile_jobs_decode import DecodeShapes, decode_jobs
from pyengine.kernels.moe_align import max_padded_rows, moe_align_config
from pyengine.kernels.moe_sum_pairs import moe_sum_pairs_config
from pyengine.kernels import residual_rmsnorm as rmsnorm

DTYPES = {short: dtypes.torch_dtype(name) for name, short in dtypes.SHORT.items()}
# The GPU whose tuned files (kernels/configs/*__<gpu>__*.json) the engine would read.
REFERENCE_GPU = {80: "NVIDIA A100-SXM4-80GB", 90: "NVIDIA H100 80GB HBM3", 100: "NVIDIA B200"}
# Every @triton.jit kernel of pyengine.kernels: name -> module. Helpers they call
# (tiles.grouped_tile, _residual_chunk, _store_normed) are compiled inline with them.
KERNELS = {
    "_moe_column_kernel": "pyengine.kernels.moe_column_swiglu",
    "_moe_row_kernel": "pyengine.kernels.moe_row_down",
    "_residual_rmsnorm_kernel": "pyengine.kernels.residual_rmsnorm",
    "_moe_align_kernel": "pyengine.kernels.moe_align",
    "_moe_sum_pairs_kernel": "pyengine.kernels.moe_sum_pairs",
    "_decode_attention_split_kernel": "pyengine.kernels.decode_attention",
    "_decode_attention_combine_kernel": "pyengine.kernels.decode_attention",
    "_decode_mla_split_kernel": "pyengine.kernels.decode_attention_mla",
    "_qk_rope_cache_kernel": "pyengine.kernels.qk_rope_cache",
    "_mla_rope_cache_kernel": "pyengine.kernels.mla_rope_cache",
    "_router_topk_kernel": "pyengine.kernels.router_topk",
}
INLINE_HELPERS = {"grouped_tile", "_residual_chunk", "_store_normed", "_chunk_experts",
                  "_split_bounds", "_take_largest", "_tile_rows", "_online_softmax"}


@dataclass(frozen=True)
class Shapes:
    """What one deployment launches the kernels with (see pyengine.cli.kernels.shapes_from_spec)."""
    E: int
    H: int
    top_k: int
    ffn_shards: tuple[int, ...]  # F_r of each experts-stage rank
    tokens: tuple[int, ...]  # rows of the expert GEMMs per launch (tokens, or EP pair rows)
    num_partials: int  # tensors the output stage's residual+rmsnorm sums
    norm_tokens: tuple[int, ...] = ()  # rows of the residual+rmsnorm (default: tokens)
    decode_tokens: tuple[int, ...] = ()  # decode steps' rows: the expert GEMMs' decode tiles
    decode: DecodeShapes | None = None  # the decode path's attention / router kernels, if any
    expert_bias: bool = False  # the expert GEMMs add b_gate / b_up / b_down (gpt-oss)
    clamped: bool = False  # the column kernel's clamped SwiGLU (gpt-oss)


@dataclass
class Job:
    kernel: str  # a key of KERNELS
    variant: str  # which constexpr branch: swiglu / deterministic / atomic / single_pass ...
    dtype: str  # a key of DTYPES
    config: dict  # tile config (tuning.config_to_dict) or launch options
    source: str  # pinned / tuned / default / autotune / candidate / implied
    args: list  # launch arguments; pointers as "*<dtype>"
    meta: dict  # constexprs and launch options
    op: str | None = None  # "column" / "row": has a shared-memory estimate
    shapes: list[str] = field(default_factory=list)  # the (T, F_r) it serves

    def key(self) -> tuple:
        return (self.kernel, self.variant, self.dtype, repr(self.config), repr(self.args),
                repr(sorted(self.meta.items())), self.source)

    def to_dict(self) -> dict:
        return asdict(self)


def build_jobs(shapes: Shapes, dtypes: list[str], arch: int, gpu: str | None = None,
               all_configs: bool = False) -> list[Job]:
    """Jobs for every kernel in each dtype, deduplicated, shapes merged."""
    gpu = gpu or REFERENCE_GPU.get(arch, f"sm_{arch}")
    jobs: dict[tuple, Job] = {}
    for name in dtypes:
        if name not in DTYPES:
            raise ValueError(f"dtype={name!r}: must be one of {sorted(DTYPES)}")
        for f_r in sorted(set(shapes.ffn_shards)):
            for t in sorted(set(shapes.tokens) | set(shapes.decode_tokens)):
                # the candidate list is swept at the prefill counts; decode counts add their own tiles
                candidates = all_configs and t in shapes.tokens
                for job in _moe_jobs(shapes, name, f_r, t, arch, gpu, candidates):
                    _merge(jobs, job)
        for t in sorted(set(shapes.norm_tokens or shapes.tokens)):
            for job in _rmsnorm_jobs(shapes, name, t, all_configs):
                _merge(jobs, job)
        if shapes.decode is not None:
            for job in decode_jobs(shapes.decode, name, Job):
                _merge(jobs, job)
    return list(jobs.values())


def _merge(jobs: dict, job: Job) -> None:
    have = jobs.setdefault(job.key(), job)
    if have is not job:
        have.shapes.extend(s for s in job.shapes if s not in have.shapes)


def _moe_jobs(shapes: Shapes, dtype: str, f_r: int, t: int, arch: int, gpu: str,
              all_configs: bool) -> list[Job]:
    dt = DTYPES[dtype]
    picks = {op: tuning.pick_config(op, gpu=gpu, dtype=dt, E=shapes.E, H=shapes.H, F=f_r,
                                    num_tokens=t, top_k=shapes.top_k, arch=arch)
             for op in tuning.OPS}
    fitting = lambda op: tuning.gpu_candidates(op, arch, dt)
    align = tuning.align_for(picks["column"].config, picks["row"].config, fitting)
    runs = []  # (op, config, source, align)
    for op, pick in picks.items():
        if pick.config is None:  # autotune: every fitting candidate may be chosen
            runs += [(op, c, "autotune", align) for c in fitting(op)]
        else:
            runs.append((op, pick.config, pick.source, align))
    if all_configs:
        cand_align = tuning.align_for(None, None, fitting)
        runs += [(op, c, "candidate", cand_align) for op in tuning.OPS for c in tuning.GPU_CONFIGS[op]]
    where = f"T={t} F_r={f_r}"
    gemms = [job for op, cfg, source, al in runs
             for job in _gemm_jobs(op, cfg, source, al, shapes, dtype, f_r, t, where)]
    return gemms + [_align_job(shapes, dtype, t, align)] + _sum_pairs_jobs(shapes, dtype, t)


def _align_job(shapes: Shapes, dtype: str, t: int, block_m: int) -> Job:
    """The align launch of a shard call at t tokens (int32 ids) with the GEMMs' block."""
    pairs = t * shapes.top_k
    meta = moe_align_config(pairs, shapes.E, block_m)
    args = ["*i32"] * 5 + [pairs, shapes.E, max_padded_rows(pairs, shapes.E, block_m)]
    return Job("_moe_align_kernel", f"block_m={block_m}", dtype, {"num_warps": meta["num_warps"]},
               "implied", args, meta, shapes=[f"T={t} pairs={pairs}"])


def _sum_pairs_jobs(shapes: Shapes, dtype: str, t: int) -> list[Job]:
    """The deterministic k-sum of a shard call (fp32 pair rows -> dtype), with and without
    skipped ids (expert parallel's -1)."""
    args = ["*fp32", "*i32", f"*{dtype}", shapes.H, shapes.H, shapes.H]
    jobs = []
    for skip in (False, True):
        meta = dict(TOP_K=shapes.top_k, SKIP_IDS=skip, **moe_sum_pairs_config(shapes.H))
        jobs.append(Job("_moe_sum_pairs_kernel", f"top_k={shapes.top_k},skip_ids={skip}", dtype,
                        {"num_warps": meta["num_warps"]}, "implied", args, meta,
                        shapes=[f"T={t} H={shapes.H}"]))
    return jobs


def _gemm_jobs(op: str, cfg: triton.Config, source: str, align: int, shapes: Shapes,
               dtype: str, f_r: int, t: int, where: str) -> list[Job]:
    """The launch arguments of moe_column_swiglu / moe_row_down for contiguous tensors."""
    E, H, k = shapes.E, shapes.H, shapes.top_k
    ptr = f"*{dtype}"
    rows = max_padded_rows(t * k, E, align)
    ids = ["*i32"] * 3  # sorted_ids, expert_ids, num_padded
    common = dict(TOP_K=k, ALIGN_M=align, DOT_PRECISION="ieee" if dtype == "fp32" else None,
                  **cfg.all_kwargs())
    make = lambda kernel, variant, args, extra: Job(
        kernel, variant, dtype, tuning.config_to_dict(cfg), source, args, {**extra, **common},
        op=op, shapes=[where])
    if op == "column":
        args = [ptr] * 4 + ids + [t * k, H, f_r, rows, tuning.m_bucket(t), H, 1, H * f_r, f_r, 1, f_r, 1,
                                  ptr, ptr, f_r, 1.702, 7.0]  # b_gate, b_up, stride_be, alpha, limit
        variant = "swiglu" + ",clamped" * shapes.clamped + ",bias" * shapes.expert_bias
        return [make("_moe_column_kernel", variant, args,
                     dict(SWIGLU=True, CLAMPED=shapes.clamped, HAS_BIAS=shapes.expert_bias))]
    jobs = []
    for atomic in (False, True):  # out: [T*k, H] per pair, or [T, H] summed by atomics
        args = [ptr, ptr, "*fp32", "*fp32"] + ids + [t * k, H, f_r, rows, tuning.m_bucket(t),
                                                      f_r, 1, f_r * H, H, 1, H, 1, ptr, H]
        variant = ("atomic" if atomic else "deterministic") + ",bias" * shapes.expert_bias
        jobs.append(make("_moe_row_kernel", variant, args, dict(ATOMIC=atomic, HAS_BIAS=shapes.expert_bias)))
    return jobs


def _rmsnorm_jobs(shapes: Shapes, dtype: str, t: int, all_configs: bool) -> list[Job]:
    """fused_residual_rmsnorm as stage 2 calls it (no residual out); with all_configs also
    the residual-out and the chunked (long-row) branches."""
    H = shapes.H
    block_h = min(triton.next_power_of_2(H), rmsnorm.MAX_BLOCK_H)
    (cfg,) = rmsnorm.residual_rmsnorm_configs(H)
    ptr = f"*{dtype}"
    args = [ptr] * 8 + [H, 1e-5] + [H] * 7  # x, p0..p3, w, h, out; H, eps; row strides
    variants = [(block_h >= H, False)]
    if all_configs:
        variants += [(block_h >= H, True), (False, False)]
    jobs = []
    for single_pass, store_h in dict.fromkeys(variants):
        name = ("single_pass" if single_pass else "chunked") + (",store_h" if store_h else "")
        meta = dict(NUM_PARTIALS=shapes.num_partials, STORE_H=store_h, SINGLE_PASS=single_pass,
                    BLOCK_H=block_h, num_warps=cfg.num_warps)
        source = "implied" if (single_pass, store_h) == variants[0] else "candidate"
        jobs.append(Job("_residual_rmsnorm_kernel", f"{name},partials={shapes.num_partials}",
                        dtype, {"num_warps": cfg.num_warps}, source, args, meta,
                        shapes=[f"T={t} H={H}"]))
    return jobs


def estimate(job: Job, arch: int) -> int | None:
    """The run-time shared-memory estimate of a GEMM job (None for other kernels)."""
    if job.op is None:
        return None
    cfg = tuning.config_from_dict(job.config)
    return smem.estimate_moe_shared(job.op, cfg, DTYPES[job.dtype].itemsize, arch)
