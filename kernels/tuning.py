"""Config selection for the MoE GEMMs: env pin > tuned JSON > default, or autotune.

`pick_config` is the decision for a named GPU (no device needed): the runtime's
`select_config` calls it with the local GPU's name, `pyengine kernels compile` with the
reference GPU of the architecture it compiles for. Autotune candidates that do not fit the
architecture's shared memory (kernels/smem.py) are dropped before they are ever timed.

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
from typing import NamedTuple

import torch
import triton

from pyengine.core import dtypes

from pyengine.kernels import decode_configs, smem

OPS = ("column", "row")
CONFIG_DIR = Path(__file__).with_name("configs")
M_BUCKET_MIN, M_BUCKET_MAX = 16, 16384
META_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
ENV_PIN = {"column": "PYENGINE_MOE_COLUMN_CONFIG", "row": "PYENGINE_MOE_ROW_CONFIG"}
ENV_PIN_BOTH = "PYENGINE_MOE_CONFIG"  # pins both GEMMs unless the per-op variable is set
ENV_AUTOTUNE = "PYENGINE_AUTOTUNE"


def short_dtype(dtype: torch.dtype) -> str | None:
    """bf16 / fp16 / fp32 (pyengine.core.dtypes' short names), or None for other dtypes."""
    return dtypes.SHORT.get(str(dtype).removeprefix("torch."))


def _cfg(bm, bn, bk, gm, warps, stages):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": gm},
                         num_warps=warps, num_stages=stages)


# The interpreter runs numpy per program: tiny tiles keep CPU tests fast and make small
# test shapes cross several tiles. One config, so the autotuner never benchmarks on CPU.
CPU_CONFIGS = [_cfg(16, 16, 16, 2, 1, 1)]

# Hopper bf16 candidates. The column kernel holds two fp32 accumulators (gate, up), so its
# tiles are smaller than the row kernel's for the same register budget.
# Three column candidates compile to 255 registers per thread on sm_90 (64x128x64 w4 s3,
# 128x128x64 w8 s3, 128x128x32 w8 s4) and do not spill in bf16/fp16 (Triton 3.6 and 3.9).
# Kept. For the first two, shared memory (121 / 145 KB) already limits an SM to one
# program, so fewer registers would not raise occupancy. The third (97 KB) would fit two
# 8-warp programs by shared memory, but two need <= 128 registers per thread, which its
# two 128x128 fp32 accumulators alone take: no register budget avoids that cost without
# spilling; whether it beats 128x128x64 s3 is for the tuner to measure.
# docs/kernels_compile.md has the measured table.
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
# Up to decode_configs.DECODE_MAX_TOKENS tokens the default is decode_configs.decode_config.
# Triton specialises integer arguments on divisibility by 16. When H or F_r is not a
# multiple of it (uneven TP shards, test shapes), it cannot prove rows aligned: loads go
# element by element with a 64-bit address each, and the defaults above spill on sm_90
# (`pyengine kernels compile`: 128 B/thread at F_r=7167, up to 4300 B/thread at H=40 in
# bf16). These smaller tiles do not spill at any of those shapes (at most 168 registers
# with Triton 3.6 and 3.9; 16x64x64 reached 255 and spilled 8 B with 3.6).
ALIGN_ELEMS = 16
GPU_DEFAULT_UNALIGNED = {"column": _cfg(16, 64, 32, 8, 4, 3), "row": _cfg(16, 64, 32, 8, 4, 3)}


class Pick(NamedTuple):
    """A config decision and where it came from: pinned, autotune (config None), tuned, default."""
    config: triton.Config | None
    source: str


def device_arch(device: torch.device) -> int:
    """Compute capability as one number (sm_90 -> 90) of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def gpu_candidates(op: str, arch: int, dtype: torch.dtype) -> list[triton.Config]:
    """GPU autotune candidates for `op` that fit `arch`'s shared memory in `dtype`."""
    _check_op(op)
    return [c for c in GPU_CONFIGS[op] if smem.fits(op, c, dtype.itemsize, arch)]


def moe_configs(op: str, device: torch.device, dtype: torch.dtype | None = None) -> list[triton.Config]:
    """Autotune candidates for `op` ("column" or "row") on `device`; with a dtype, only those
    that fit the device's shared memory (the rule of kernels/smem.py)."""
    _check_op(op)
    if device.type == "cpu":
        return list(CPU_CONFIGS)
    if dtype is None:
        return list(GPU_CONFIGS[op])
    return gpu_candidates(op, device_arch(device), dtype)


def prune_configs(op: str, configs, align_m: int, dtype: torch.dtype, arch: int | None):
    """The autotuner's early prune: tiles must divide the alignment block exactly and (on a
    GPU, arch given) fit its shared memory."""
    return [c for c in configs if align_m % c.kwargs["BLOCK_M"] == 0
            and (arch is None or smem.fits(op, c, dtype.itemsize, arch))]


def launch_arch(tensor: torch.Tensor) -> int | None:
    """Architecture a launch on `tensor`'s device compiles for; None on CPU (interpreter)."""
    return device_arch(tensor.device) if tensor.device.type == "cuda" else None


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
    return Path(directory) / f"{op}__{gpu_key}__{short_dtype(dtype)}__E{E}_H{H}_F{F}.json"


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


def pick_config(op: str, *, gpu: str, dtype: torch.dtype, E: int, H: int, F: int,
                num_tokens: int, top_k: int = 1, sms: int | None = None, arch: int = 90,
                config_dir: Path | str = CONFIG_DIR) -> Pick:
    """The config the engine launches `op` with on a GPU named `gpu` (no device needed).

    Order: env pin (PYENGINE_MOE_<OP>_CONFIG, then PYENGINE_MOE_CONFIG) >
    PYENGINE_AUTOTUNE=1 (config None: autotune over the candidates) > tuned JSON for this
    GPU and shape > built-in default (by alignment of H and F, then by token count: the
    decode tile of decode_configs up to DECODE_MAX_TOKENS, sized for `sms` SMs, by default
    the count of the GPU named `gpu`).
    """
    _check_op(op)
    pinned = os.environ.get(ENV_PIN[op]) or os.environ.get(ENV_PIN_BOTH)
    if pinned:
        return Pick(parse_config(pinned), "pinned")
    if os.environ.get(ENV_AUTOTUNE) == "1":
        return Pick(None, "autotune")
    if short_dtype(dtype) is not None:
        tuned = load_tuned(config_path(op, gpu, dtype, E, H, F, config_dir), num_tokens)
        if tuned is not None:
            return Pick(tuned, "tuned")
    if H % ALIGN_ELEMS or F % ALIGN_ELEMS:
        return Pick(GPU_DEFAULT_UNALIGNED[op], "default")
    if num_tokens <= decode_configs.DECODE_MAX_TOKENS:  # a 64-row tile would be mostly padding
        N, K = (F, H) if op == "column" else (H, F)
        sms = sms or decode_configs.sm_count(gpu)
        return Pick(decode_configs.decode_config(op, num_tokens=num_tokens, top_k=top_k, E=E, N=N,
                                                 K=K, dtype=dtype, sms=sms, arch=arch), "default")
    return Pick(GPU_DEFAULT[op], "default")


def select_config(op: str, *, device: torch.device, dtype: torch.dtype, E: int, H: int,
                  F: int, num_tokens: int, top_k: int = 1) -> triton.Config | None:
    """The config to launch `op` with on `device`; None means "autotune over moe_configs(op)".

    CPU (the interpreter) takes CPU_CONFIGS unless an env pin says otherwise; a GPU takes
    pick_config for its name.
    """
    _check_op(op)
    if device.type == "cpu" and not (os.environ.get(ENV_PIN[op]) or os.environ.get(ENV_PIN_BOTH)):
        return CPU_CONFIGS[0]
    if device.type != "cuda":
        return pick_config(op, gpu=device.type, dtype=dtype, E=E, H=H, F=F, num_tokens=num_tokens,
                           top_k=top_k).config
    props = torch.cuda.get_device_properties(device)
    return pick_config(op, gpu=props.name, dtype=dtype, E=E, H=H, F=F, num_tokens=num_tokens,
                       top_k=top_k, sms=props.multi_processor_count,
                       arch=device_arch(device)).config


def align_block_m(column: triton.Config | None, row: triton.Config | None,
                  device: torch.device, dtype: torch.dtype | None = None) -> int:
    """Alignment block shared by both GEMMs on `device` (see align_for)."""
    return align_for(column, row, lambda op: moe_configs(op, device, dtype))


def align_for(column: triton.Config | None, row: triton.Config | None, candidates) -> int:
    """The larger BLOCK_M of the two configs (powers of two, so the smaller tiles it
    exactly); for autotune (None) the largest of candidates(op)'s."""
    sizes = [c.kwargs["BLOCK_M"] for op, cfg in (("column", column), ("row", row))
             for c in ([cfg] if cfg is not None else candidates(op))]
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
