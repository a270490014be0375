"""Published measurements the project holds itself against, each with its source.

One home: the planner's calibration test and bench/bench_kernels.py both read these."""

from __future__ import annotations

VLLM_FUSED_MOE_SOURCE = (
    "vLLM PR #24700, H100 80GB HBM3, `benchmark_moe.py --model=mistralai/Mixtral-8x7B-Instruct-v0.1 -tp=2`, "
    "tuned config, whole fused_moe call")
"""The seed's TP=2 expert shard exactly: E 8, H 4096, F_r 7168, top-2, bf16."""

VLLM_FUSED_MOE_US = {1: 144.03, 2: 229.28, 4: 351.10, 8: 434.98, 16: 471.49, 24: 478.27, 32: 487.35,
                     48: 487.85, 64: 483.14, 96: 494.42, 128: 491.39, 256: 536.77, 512: 662.33,
                     1024: 833.72, 1536: 1122.93}
"""Microseconds per call by token count."""
