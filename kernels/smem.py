"""Shared memory: the per-block limit of each GPU architecture, and what a MoE GEMM tile needs.

One rule serves both the run time and the compile check: a config fits when its estimated
shared memory is at most the architecture's limit. The autotuner's early prune and
`tuning.moe_configs` drop candidates that do not fit (so the tuner never times them), and
`pyengine kernels compile` measures the real figure from the compiled kernel and checks
that the estimate agrees with it (tests/kernels/test_kernels_compile.py).

Why a closed form and not a cached compile result: it needs no compiler at run time, it
does not go stale when a tuned file or a new candidate appears, and the test that compares
it with the compiled metadata fails as soon as a Triton release changes the layout.
"""

from __future__ import annotations

# Maximum shared memory per thread block with the opt-in attribute
# (cudaFuncAttributeMaxDynamicSharedMemorySize), in bytes. Source: CUDA C++ Programming
# Guide, "Compute Capabilities", table "Technical Specifications per Compute Capability",
# row "Maximum amount of shared memory per thread block": 163 KB on 8.0, 99 KB on 8.6/8.9,
# 227 KB on 9.0 and 10.0, 99 KB on 12.0 (1 KB = 1024 B). The SM itself has 1 KB more
# (228 KB on 9.0), which CUDA reserves per block.
SHARED_LIMIT = {
    80: 163 * 1024,
    86: 99 * 1024,
    89: 99 * 1024,
    90: 227 * 1024,  # 232448
    100: 227 * 1024,
    120: 99 * 1024,
}

# From sm_90 on, a Triton kernel that uses shared memory declares 1 KB of it statically in
# its cubin, on top of the dynamic allocation it requests (seen on sm_90, sm_100 and sm_120
# with Triton 3.6 and 3.9; none on sm_80). The launch needs static + dynamic <=
# SHARED_LIMIT, so both count.
STATIC_SHARED = 1024
# Architectures whose tl.dot lowers to an asynchronous MMA (sm_120 uses mma.sync).
ASYNC_MMA = {90: "wgmma", 100: "tcgen05"}
# On sm_100 the compiled kernels hold 16 B more per tl.dot than their operand buffers
# (the mbarriers that signal tcgen05 MMA completion); measured, Triton 3.6 and 3.9.
BARRIER_BYTES_PER_DOT = 16
# Operand tiles streamed through shared memory per K step: A (BLOCK_M x BLOCK_K) and
# this many B tiles (BLOCK_K x BLOCK_N): the column kernel reads w_gate and w_up.
B_TILES = {"column": 2, "row": 1}


def shared_limit(arch: int) -> int:
    if arch not in SHARED_LIMIT:
        raise ValueError(f"arch={arch}: no shared-memory limit known; known: {sorted(SHARED_LIMIT)}")
    return SHARED_LIMIT[arch]


def async_mma(arch: int, elem_bytes: int, block_m: int) -> bool:
    """True when tl.dot lowers to an asynchronous MMA (wgmma on sm_90, tcgen05 on sm_100).

    Those need 16-bit operands and at least 64 rows per warpgroup; fp32 with
    input_precision="ieee" and smaller tiles use mma.sync or FMA instead.
    """
    return arch in ASYNC_MMA and elem_bytes == 2 and block_m >= 64


def estimate_moe_shared(op: str, cfg, elem_bytes: int, arch: int) -> int:
    """Bytes of shared memory (static + dynamic) one program of `op` needs with `cfg`.

    Triton's software pipeline keeps num_stages copies of the operand tiles when the MMA is
    asynchronous (one is read by the MMA still in flight) and num_stages - 1 otherwise; the
    epilogue's layout conversion reuses that space. Exact when H and F_r are multiples of
    16 (loads become async copies into shared memory); an upper bound otherwise (loads that
    Triton cannot prove aligned are staged in registers), so there the rule is stricter.
    """
    if op not in B_TILES:
        raise ValueError(f"op={op!r}: must be one of {tuple(B_TILES)}")
    bm, bn, bk = (cfg.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    tiles = (bm * bk + B_TILES[op] * bk * bn) * elem_bytes
    is_async = async_mma(arch, elem_bytes, bm)
    buffers = cfg.num_stages if is_async else max(cfg.num_stages - 1, 1)
    barriers = BARRIER_BYTES_PER_DOT * B_TILES[op] if is_async and arch >= 100 else 0
    return buffers * tiles + barriers + (STATIC_SHARED if arch >= 90 else 0)


def fits(op: str, cfg, elem_bytes: int, arch: int) -> bool:
    """The run-time rule: the estimate is within the architecture's per-block limit."""
    return estimate_moe_shared(op, cfg, elem_bytes, arch) <= shared_limit(arch)
