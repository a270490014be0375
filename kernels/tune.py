"""`tune()`: time every candidate config of the two expert GEMMs on this GPU and write the
fastest per token-count bucket to the JSON files pyengine.kernels.tuning reads at run time."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import torch
import triton

from pyengine.core.provenance import git_commit
from pyengine.kernels.moe_align import moe_align_block_size
from pyengine.kernels.moe_column_swiglu import _moe_column_swiglu, column_rows
from pyengine.kernels.moe_row_down import _moe_row_down
from pyengine.kernels.tuning import (CONFIG_DIR, OPS, config_path, config_to_dict,
                                     m_bucket, moe_configs, short_dtype)


def tune(*, dtype: torch.dtype, E: int, H: int, F: int, top_k: int, tokens: list[int],
         out_dir: Path | str = CONFIG_DIR, ops: tuple[str, ...] = OPS, seed: int = 0,
         log=print) -> list[Path]:
    """Benchmark moe_configs(op) for each T in `tokens` on the current GPU; write JSON files.

    Routing is uniform random (a balanced load, like the seed's router at init). Each config
    is timed alone (its own align block size) with triton.testing.do_bench (median, L2
    flushed). Existing buckets in a file are kept unless re-tuned.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("tune() needs a CUDA device; none is visible")
    dev = torch.device("cuda", torch.cuda.current_device())
    gpu = torch.cuda.get_device_name(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    w_gate = torch.randn(E, H, F, device=dev, dtype=dtype, generator=gen) / H ** 0.5
    w_up = torch.randn(E, H, F, device=dev, dtype=dtype, generator=gen) / H ** 0.5
    w_down = torch.randn(E, F, H, device=dev, dtype=dtype, generator=gen) / F ** 0.5
    results = {op: {} for op in ops}
    for T in tokens:
        u = torch.randn(T, H, device=dev, dtype=dtype, generator=gen)
        ids = torch.rand(T, E, device=dev, generator=gen).argsort(dim=1)[:, :top_k].to(torch.int32)
        weights = torch.full((T, top_k), 1.0 / top_k, device=dev, dtype=torch.float32)
        for op in ops:
            timings = []
            for cfg in moe_configs(op, dev, dtype):  # only those that fit shared memory
                align = moe_align_block_size(ids, E, cfg.kwargs["BLOCK_M"])
                a = torch.randn(column_rows(T * top_k, E, cfg.kwargs["BLOCK_M"]), F,
                                device=dev, dtype=dtype, generator=gen)
                if op == "column":
                    def call():
                        _moe_column_swiglu(u, w_gate, w_up, align, top_k, a, config=cfg)
                else:
                    y = torch.empty(T * top_k, H, device=dev, dtype=torch.float32)
                    def call():
                        _moe_row_down(a, w_down, weights, align, top_k, y, config=cfg)
                try:
                    ms = triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median")
                except triton.runtime.errors.OutOfResources as e:  # too much shared memory
                    log(f"  {op} T={T} {config_to_dict(cfg)}: skipped ({e})")
                    continue
                timings.append((ms, cfg))
                log(f"  {op} T={T} {config_to_dict(cfg)}: {ms * 1e3:.1f} us")
            if not timings:
                raise RuntimeError(f"no config of {op} ran for T={T} on {gpu}")
            results[op][str(m_bucket(T))] = config_to_dict(min(timings, key=lambda t: t[0])[1])
    written = []
    for op in ops:
        path = config_path(op, gpu, dtype, E, H, F, out_dir)
        old = json.loads(path.read_text())["configs"] if path.is_file() else {}
        meta = {"op": op, "gpu": gpu, "dtype": short_dtype(dtype), "E": E, "H": H, "F": F,
                "top_k": top_k, "triton": triton.__version__, "torch": torch.__version__,
                "date": datetime.date.today().isoformat(), "commit": git_commit()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "configs": {**old, **results[op]}}, indent=1) + "\n")
        written.append(path)
    return written
