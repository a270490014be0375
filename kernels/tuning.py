"""Config selection for the MoE GEMMs: env pin > tuned JSON > default, or autotune.

Tuned configs live in kernels/configs/<op>__<gpu>__<dtype>__E<E>_H<H>_F<F_r>.json as
{"meta": {...}, "configs": {"<m_bucket>": {"BLOCK_M": .., ..., "num_warps": .., "num_stages": ..}}}
where m_bucket = next power of two of T, clamped to [M_BUCKET_MIN, M_BUCKET_MAX].
pyengine.kernels.tune writes them (GPU only); `select_config()` reads them at run time.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
import triton

OPS = ("column", "row")
CONFIG_DIR = Path(__file__).with_name("configs")
M_BUCKET_MIN, M_BUCKET_MAX = 16, 16384
META_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
ENV_PIN = {"column": "PYENGINE_MOE_COLUMN_CONFIG", "row": "PYENGINE_MOE_ROW_CONFIG"}
ENV_PIN_BOTH = "PYENGINE_MOE_CONFIG"  # pins both GEMMs unless the per-op variable is set
ENV_AUTOTUNE = "PYENGINE_AUTOTUNE"
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _cfg(bm, bn, bk, gm, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_warps=warps, num_stages=stages)


# The interpreter runs numpy per program: tiny tiles keep CPU tests fast and make small
# test shapes cross several tiles. One config, so the autotuner never benchmarks on CPU.
CPU_CONFIGS = [_cfg(16, 16, 16, 2, 1, 1)]

# Hopper bf16 candidates. The column kernel holds two fp32 accumulators (gate, up), so its
# tiles are smaller than the row kernel's for the same register budget.
GPU_CONFIGS = {
    "column": [_cfg(bm, bn, bk, 8, w, s) for (bm, bn, bk, w, s) in [
        (16, 64, 128, 4, 4), (16, 128, 64, 4, 4), (32, 64, 128, 4, 4), (32, 128, 64, 4, 4),
        (64, 64, 64, 4, 4), (64, 128, 64, 8, 3), (64, 128, 64, 4, 3), (128, 64, 64, 8, 3),
        (128, 128, 64, 8, 3), (128, 128, 32, 8, 4)]],
    "row": [_cfg(bm, bn, bk, 8, w, s) for (bm, bn, bk, w, s) in [
        (16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (32, 128, 64, 4, 4), (32, 128, 128, 4, 3),
        (64, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 3), (128, 128, 64, 8, 3),
        (128, 256, 64, 8, 3), (128, 128, 32, 4, 4)]],
}
# Used when no tuned file matches: mid-size tiles that are reasonable from T=256 upwards.
GPU_DEFAULT = {"column": _cfg(64, 128, 64, 8, 8, 3), "row": _cfg(64, 128, 64, 8, 4, 4)}
GPU_DEFAULT_SMALL_M = {"column": _cfg(16, 128, 64, 8, 4, 4), "row": _cfg(16, 128, 128, 8, 4, 4)}


def moe_configs(op: str, device: torch.device) -> list[triton.Config]:
    """Autotune candidates for `op` ("column" or "row") on `device`."""
    _check_op(op)
    return list(CPU_CONFIGS) if device.type == "cpu" else list(GPU_CONFIGS[op])


def m_bucket(num_tokens: int) -> int:
    return min(max(triton.next_power_of_2(max(num_tokens, 1)), M_BUCKET_MIN), M_BUCKET_MAX)


def parse_config(text: str) -> triton.Config:
    """'BLOCK_M=64,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=4,num_stages=3' -> Config."""
    fields = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not re.fullmatch(r"\d+", value.strip()):
            raise ValueError(f"config item {item!r}: expected KEY=<positive int>")
        fields[key.strip()] = int(value)
    return config_from_dict(fields, where=repr(text))


def config_from_dict(fields: dict, where: str = "config") -> triton.Config:
    expected = set(META_KEYS) | {"num_warps", "num_stages"}
    if set(fields) != expected:
        raise ValueError(f"{where}: keys {sorted(fields)} must be exactly {sorted(expected)}")
    for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
        v = fields[key]
        if v < 1 or v & (v - 1):
            raise ValueError(f"{where}: {key}={v}: must be a power of two")
    return triton.Config({k: fields[k] for k in META_KEYS},
                         num_warps=fields["num_warps"], num_stages=fields["num_stages"])


def config_to_dict(cfg: triton.Config) -> dict:
    return {**{k: cfg.kwargs[k] for k in META_KEYS},
            "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def config_path(op: str, gpu: str, dtype: torch.dtype, E: int, H: int, F: int,
                directory: Path | str = CONFIG_DIR) -> Path:
    gpu_key = re.sub(r"[^A-Za-z0-9]+", "_", gpu).strip("_")
    return Path(directory) / f"{op}__{gpu_key}__{DTYPE_NAMES[dtype]}__E{E}_H{H}_F{F}.json"


def load_tuned(path: Path, num_tokens: int) -> triton.Config | None:
    """Config for the nearest M bucket in a tuned file (exact bucket first), or None."""
    if not path.is_file():
        return None
    configs = json.loads(path.read_text())["configs"]
    if not configs:
        return None
    want = m_bucket(num_tokens)
    best = min(configs, key=lambda b: (abs(int(b).bit_length() - want.bit_length()), int(b)))
    return config_from_dict(configs[best], where=f"{path.name}[{best}]")


def select_config(op: str, *, device: torch.device, dtype: torch.dtype, E: int, H: int,
                  F: int, num_tokens: int) -> triton.Config | None:
    """The config to launch `op` with; None means "autotune over moe_configs(op)".

    Order: env pin (PYENGINE_MOE_<OP>_CONFIG, then PYENGINE_MOE_CONFIG) > CPU config >
    PYENGINE_AUTOTUNE=1 (None) > tuned JSON for this GPU and shape > built-in default.
    """
    _check_op(op)
    pinned = os.environ.get(ENV_PIN[op]) or os.environ.get(ENV_PIN_BOTH)
    if pinned:
        return parse_config(pinned)
    if device.type == "cpu":
        return CPU_CONFIGS[0]
    if os.environ.get(ENV_AUTOTUNE) == "1":
        return None
    gpu = torch.cuda.get_device_name(device)
    tuned = load_tuned(config_path(op, gpu, dtype, E, H, F), num_tokens) if dtype in DTYPE_NAMES else None
    if tuned is not None:
        return tuned
    # Few tokens per expert (decode-like): a 64-row tile would be mostly padding.
    return (GPU_DEFAULT_SMALL_M if num_tokens <= 64 else GPU_DEFAULT)[op]


def align_block_m(column: triton.Config | None, row: triton.Config | None,
                  device: torch.device) -> int:
    """Alignment block shared by both GEMMs: the larger BLOCK_M (powers of two, so the
    smaller tiles it exactly); for autotune (None) the largest candidate's."""
    sizes = [c.kwargs["BLOCK_M"] for op, cfg in (("column", column), ("row", row))
             for c in ([cfg] if cfg is not None else moe_configs(op, device))]
    return max(sizes)


def check_runnable(kernel, device: torch.device) -> None:
    """CPU tensors need the interpreter, which triton.jit picks at import time."""
    from triton.runtime.interpreter import InterpretedFunction

    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError("CPU tensors run only under the Triton interpreter: set "
                           "TRITON_INTERPRET=1 before pyengine.kernels is imported")


def _check_op(op: str) -> None:
    if op not in OPS:
        raise ValueError(f"op={op!r}: must be one of {OPS}")
