"""MoE kernels vs cuBLAS baselines at the seed shapes (GPU only).

    python bench/bench_kernels.py [--tokens 1 8 16 32 64 256 1024] [--dtype bf16] [--peak-tflops X] [--json]

Decode shapes (1-64 tokens per TP shard) stream the experts' weights: each row also reports the
weight bytes the op reads (the experts this routing touches), the achieved GB/s and its share of a
device-to-device copy measured in the same run. The whole shard's Triton row carries the published
fused-MoE time for the same work where one exists (pyengine.core.published names the source).
With --json, one JSON object per line, flushed as it is measured (first the environment, then each
row), so a run cut off returns every row that finished.

Ops: column (gather + gate/up GEMMs + SwiGLU), row (down GEMM + router weight + k-sum) and
the whole shard (align + both). Providers, all from the same run:
  triton   pyengine.kernels (the shard with check_ids=False, as the pipeline calls it)
  loop     torch per-expert loop on cuBLAS (sort, gather, per-expert GEMMs, index_add)
  grouped  torch._grouped_mm over expert-sorted rows (where this torch/GPU has it)
  dense    one cuBLAS GEMM of the same FLOPs (no routing): the practical ceiling
FLOPs count useful work only (T*k rows, not alignment padding), a multiply-add as 2.
Times: triton.testing.do_bench (L2 flushed between reps) median and p20/p80, after a
warm-up call that also triggers compilation and any autotuning.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from pyengine.core import dtypes, provenance
from pyengine.core.published import VLLM_FUSED_MOE_SOURCE, VLLM_FUSED_MOE_US

# bf16 dense tensor-core peaks (TFLOP/s, no sparsity), matched by substring, first wins.
PEAK_BF16_TFLOPS = [("H200", 989.4), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4)]
DTYPES = ("bf16", "fp16")  # tensor-core dtypes; short names from pyengine.core.dtypes


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 16, 32, 64, 256, 1024],
                   help="tokens per TP shard: decode (1-64) and prefill (256, 1024) (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--hidden", type=int, default=4096, help="H (seed 4096)")
    p.add_argument("--ffn-shard", type=int, default=7168, help="F_r (seed F=14336 at TP 2)")
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--peak-tflops", type=float, default=None, help="override the peak table")
    p.add_argument("--warmup-ms", type=int, default=25)
    p.add_argument("--rep-ms", type=int, default=200)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p.parse_args(argv)


def environment() -> dict:
    import triton

    env = provenance.record(torch.device("cuda", torch.cuda.current_device()))
    return {**env, "gpu": torch.cuda.get_device_name(), "triton": triton.__version__}


def peak_tflops(name: str, override: float | None) -> float | None:
    if override is not None:
        return override
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


# ---- baselines ----------------------------------------------------------------------------
def sort_pairs(ids, E):
    flat = ids.reshape(-1).long()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=E)
    return order, counts


def loop_column(u, wg, wu, order, counts, k):
    x = u[order // k]
    out = torch.empty(x.shape[0], wg.shape[2], device=u.device, dtype=u.dtype)
    start = 0
    for e, c in enumerate(counts.tolist()):  # host sync, as any per-expert loop has
        if c:
            xe = x[start:start + c]
            out[start:start + c] = torch.nn.functional.silu(xe @ wg[e]) * (xe @ wu[e])
            start += c
    return out


def loop_row(a, wd, w, order, counts, k, T):
    y = torch.zeros(T, wd.shape[2], device=a.device, dtype=torch.float32)
    start = 0
    for e, c in enumerate(counts.tolist()):
        if c:
            seg = order[start:start + c]
            y.index_add_(0, seg // k, (a[start:start + c] @ wd[e]).float() * w.reshape(-1)[seg, None])
            start += c
    return y.to(a.dtype)


def loop_shard(u, wg, wu, wd, ids, w, E, k, T):
    order, counts = sort_pairs(ids, E)
    return loop_row(loop_column(u, wg, wu, order, counts, k), wd, w, order, counts, k, T)


def grouped_column(u, wgu, order, counts, k):
    x = u[order // k]
    h = torch._grouped_mm(x, wgu, offs=torch.cumsum(counts, 0).to(torch.int32))
    F = wgu.shape[2] // 2
    return torch.nn.functional.silu(h[:, :F]) * h[:, F:]


def grouped_row(a, wd, w, order, counts, k, T):
    out = torch._grouped_mm(a, wd, offs=torch.cumsum(counts, 0).to(torch.int32))
    y = torch.zeros(T, wd.shape[2], device=a.device, dtype=torch.float32)
    return y.index_add_(0, order // k, out.float() * w.reshape(-1)[order, None]).to(a.dtype)


# ---- one token count ------------------------------------------------------------------------
def weight_bytes(op: str, touched: int, H: int, F: int, elem: int) -> int:
    """Expert weight bytes an op reads once: gate and up (column), down (row), all three (shard)."""
    matrices = {"column": 2, "row": 1, "shard": 3}.get(op, 0)
    return touched * matrices * H * F * elem


def published(row: dict) -> dict:
    """The published time for the whole shard's Triton row at this token count, or nothing."""
    us = VLLM_FUSED_MOE_US.get(row["T"])
    if row["op"] != "shard" or row["provider"] != "triton" or us is None:
        return {}
    out = {"published_us": us, "published_source": VLLM_FUSED_MOE_SOURCE}
    if "ms" in row:
        out["x_published"] = us / (1e3 * row["ms"])
    return out


def copy_gb_s(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate (bytes read + written per second), timed like the kernels."""
    import triton

    src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), quantiles=[0.5])
    ms = ms[0] if isinstance(ms, (list, tuple)) else ms
    return nbytes / (ms * 1e-3) / 1e9


def add_streaming(row: dict, copy_rate: float | None) -> dict:
    """Achieved weight-streaming GB/s and its share of the measured copy rate."""
    if "ms" in row and row.get("weight_bytes"):
        row["weight_gb_s"] = row["weight_bytes"] / (row["ms"] * 1e-3) / 1e9
        row["pct_copy"] = 100 * row["weight_gb_s"] / copy_rate if copy_rate else None
    row.update(published(row))
    return row


def bench_tokens(T, args, dtype, log):
    import triton

    from pyengine.kernels import tuning

    from pyengine.kernels.moe_align import moe_align_block_size

    from pyengine.kernels.moe_expert_shard import moe_expert_shard
    from pyengine.kernels.moe_column_swiglu import moe_column_swiglu
    from pyengine.kernels.moe_row_down import moe_row_down

    E, k, H, F = args.experts, args.top_k, args.hidden, args.ffn_shard
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    u = torch.randn(T, H, device=dev, dtype=dtype, generator=g)
    wg = torch.randn(E, H, F, device=dev, dtype=dtype, generator=g) / H ** 0.5
    wu = torch.randn(E, H, F, device=dev, dtype=dtype, generator=g) / H ** 0.5
    wd = torch.randn(E, F, H, device=dev, dtype=dtype, generator=g) / F ** 0.5
    ids = torch.rand(T, E, device=dev, generator=g).argsort(dim=1)[:, :k].to(torch.int32)
    w = torch.softmax(torch.randn(T, k, device=dev, generator=g), dim=1)
    wgu = torch.cat([wg, wu], dim=2)  # grouped/dense baselines: gate and up in one GEMM
    order, counts = sort_pairs(ids, E)
    touched = int((counts > 0).sum())
    shape = dict(device=dev, dtype=dtype, E=E, H=H, F=F, num_tokens=T, top_k=k)
    col_cfg, row_cfg = tuning.select_config("column", **shape), tuning.select_config("row", **shape)
    block_m = tuning.align_block_m(col_cfg, row_cfg, dev)
    align = moe_align_block_size(ids, E, block_m)
    a_al = moe_column_swiglu(u, wg, wu, align, k, config=col_cfg)
    a_sorted = loop_column(u, wg, wu, order, counts, k)
    x_dense = u.repeat_interleave(k, dim=0)
    Tk = T * k
    flops = {"column": 2 * Tk * H * 2 * F, "row": 2 * Tk * F * H}
    flops["shard"] = flops["column"] + flops["row"]
    providers = {
        "column": {
            "triton": lambda: moe_column_swiglu(u, wg, wu, align, k, config=col_cfg),
            "loop": lambda: loop_column(u, wg, wu, order, counts, k),
            "grouped": lambda: grouped_column(u, wgu, order, counts, k),
            "dense": lambda: x_dense @ wgu[0]},
        "row": {
            "triton": lambda: moe_row_down(a_al, wd, w, align, k, config=row_cfg),
            "loop": lambda: loop_row(a_sorted, wd, w, order, counts, k, T),
            "grouped": lambda: grouped_row(a_sorted, wd, w, order, counts, k, T),
            "dense": lambda: a_sorted @ wd[0]},
        "shard": {
            "triton": lambda: moe_expert_shard(u, wg, wu, wd, ids, w, check_ids=False),
            "loop": lambda: loop_shard(u, wg, wu, wd, ids, w, E, k, T),
            "grouped": lambda: grouped_row(grouped_column(u, wgu, order, counts, k), wd, w,
                                           order, counts, k, T),
            "dense": lambda: (x_dense @ wgu[0])[:, :F] @ wd[0]},
    }
    rows = []
    for op, fns in providers.items():
        for name, fn in fns.items():
            row = {"op": op, "T": T, "provider": name, "gflop": flops[op] / 1e9,
                   "weight_bytes": weight_bytes(op, touched, H, F, u.element_size())}
            try:
                fn()  # compile / autotune outside the timed region
                torch.cuda.synchronize()
                med, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                                        quantiles=[0.5, 0.2, 0.8])
            except (RuntimeError, AttributeError, NotImplementedError) as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                log(f"{op} T={T} {name}: not available ({row['error']})")
                rows.append(row)
                continue
            row.update(ms=med, p20_ms=p20, p80_ms=p80, tflops=flops[op] / med / 1e9)
            rows.append(row)
    align_ms = triton.testing.do_bench(lambda: moe_align_block_size(ids, E, block_m),
                                       quantiles=[0.5, 0.2, 0.8])
    rows.append({"op": "align", "T": T, "provider": "triton", "gflop": 0.0, "ms": align_ms[0],
                 "p20_ms": align_ms[1], "p80_ms": align_ms[2], "tflops": None})
    return rows


def add_ratios(rows, peak):
    by = {(r["op"], r["T"], r["provider"]): r for r in rows}
    for r in rows:
        for base in ("loop", "grouped", "dense"):
            b = by.get((r["op"], r["T"], base))
            ok = b is not None and "ms" in b and "ms" in r and r["op"] != "align"
            r[f"x_{base}"] = b["ms"] / r["ms"] if ok else None
        r["pct_peak"] = 100 * r["tflops"] / peak if peak and r.get("tflops") else None


def print_rows(env, rows, peak):
    from pyengine.report.tables import print_table

    for key in ("gpu", "nvidia_smi", "date", "commit", "command", "torch", "triton"):
        print(f"# {key}: {env[key]}")
    print(f"# peak: {peak if peak else 'unknown (pass --peak-tflops)'} TFLOP/s bf16 dense")
    fmt = lambda v, f: "-" if v is None else format(v, f)
    table = []
    for r in rows:
        if "error" in r:
            table.append([r["op"], r["T"], r["provider"], "n/a", "", "", "", "", "", "", "", "", "",
                          r["error"][:40]])
            continue
        table.append([r["op"], r["T"], r["provider"], fmt(r["ms"], ".4f"), fmt(r["p20_ms"], ".4f"),
                      fmt(r["p80_ms"], ".4f"), fmt(r["tflops"], ".1f"), fmt(r["x_loop"], ".2f"),
                      fmt(r["x_dense"], ".2f"), fmt(r["pct_peak"], ".1f"), fmt(r.get("weight_gb_s"), ".0f"),
                      fmt(r.get("pct_copy"), ".0f"), fmt(r.get("published_us"), ".2f"), ""])
    print(f"# copy: {env['copy_gb_s']:.0f} GB/s device-to-device (read + write), this run")
    print(f"# published: {VLLM_FUSED_MOE_SOURCE}")
    print_table("MoE expert-shard kernels",
                [("op", "left"), "T", ("provider", "left"), "median ms", "p20", "p80", "TFLOP/s",
                 "x loop", "x dense", "% peak", "weights GB/s", "% copy", "published us", "note"], table)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: no CUDA device visible; these benchmarks time GPU kernels "
              "(run on a GPU machine)", file=sys.stderr)
        return 2
    env = environment()
    peak = peak_tflops(env["gpu"], args.peak_tflops)
    log = (lambda s: print(s, file=sys.stderr)) if args.json else print
    copy_rate = copy_gb_s()
    env["copy_gb_s"] = copy_rate
    if args.json:
        print(json.dumps({"env": env, "peak_tflops": peak}), flush=True)
    rows = []
    for T in args.tokens:
        done = bench_tokens(T, args, dtypes.torch_dtype(args.dtype), log)
        add_ratios(done, peak)
        for r in done:
            add_streaming(r, copy_rate)
            if args.json:
                print(json.dumps(r), flush=True)
        rows += done
    if not args.json:
        print_rows(env, rows, peak)
    return 0


if __name__ == "__main__":
    sys.exit(main())
