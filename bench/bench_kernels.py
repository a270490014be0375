"""MoE kernels vs cuBLAS baselines at the seed shapes (GPU only).

    python bench/bench_kernels.py [--tokens 1 8 16 32 64 256 1024] [--dtype bf16] [--peak-tflops X] [--json]
    python bench/bench_kernels.py --decode [--json]   # decode path: paged attention, align

--decode rows: paged split-K decode attention (32 heads, 8 kv heads, d 128, 16-key blocks) for
8/64/256 sequences x 1k/4k/8k positions, its K/V bytes read / time beside the copy rate, with
torch SDPA over a contiguous cache as the baseline; and the single-launch align against the
torch alignment it replaced (~15 launches), at decode and prefill pair counts.

Decode shapes (1-64 tokens per TP shard) stream the experts' weights: each row also reports the
weight bytes the op reads (the experts this routing touches), the achieved GB/s and its share of a
device-to-device copy measured in the same run. The whole shard's Triton row carries the published
fused-MoE time for the same work where one exists (pyengine.core.published names the source).
With --json, one JSON object per line, flushed as it is measured (first the environment, then each
row), so a run cut off returns every row that finished.

Ops: column (gather + gate/up GEMMs + SwiGLU), row (down GEMM + router weight + k-sum) and
the whole shard (align + both). Providers, all from the same run:
  triton   pyengine.kernels (the shard with check_ids=False, as the pipeline calls it)
  prepared pyengine.kernels' ExpertShard (configs picked once, buffers kept: 4 launches)
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
    p.add_argument("--decode", action="store_true",
                   help="the decode path instead: paged decode attention and the align")
    p.add_argument("--seqs", type=int, nargs="+", default=[8, 64, 256], help="--decode: sequences")
    p.add_argument("--positions", type=int, nargs="+", default=[1024, 4096, 8192],
                   help="--decode: keys per sequence")
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

    from pyengine.kernels.moe_expert_shard import ExpertShard, moe_expert_shard
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
    prepared = ExpertShard(E, H, F, k, dtype, dev)
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
            "prepared": lambda: prepared(u, wg, wu, wd, ids, w),
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


# ---- --decode: paged decode attention and the align -------------------------------------------
DECODE_ATTN = dict(heads=32, kv_heads=8, head_dim=128, block_size=16)  # the seed model's attention
ALIGN_CASES = [(1, 8, 256, 16), (64, 8, 256, 16), (256, 2, 8, 16), (8192, 8, 256, 64)]  # T, k, E, block_m


def kv_bytes(seqs: int, positions: int, kv_heads: int, head_dim: int, elem: int) -> int:
    """K and V bytes one decode step's attention must read: every cached key and value once."""
    return 2 * seqs * positions * kv_heads * head_dim * elem


def add_kv_rate(row: dict, copy_rate: float | None) -> dict:
    """Achieved K/V read GB/s and its share of the measured copy rate."""
    if "ms" in row and row.get("kv_bytes"):
        row["kv_gb_s"] = row["kv_bytes"] / (row["ms"] * 1e-3) / 1e9
        row["pct_copy"] = 100 * row["kv_gb_s"] / copy_rate if copy_rate else None
    return row


def add_decode_ratios(rows: list[dict]) -> None:
    """x_baseline = the baseline's time / the row's, per (op, size): SDPA over a contiguous
    cache for attention, the torch alignment for align."""
    base = {(r["op"], r["size"]): r for r in rows if r["provider"] in ("sdpa", "torch") and "ms" in r}
    for r in rows:
        b = base.get((r["op"], r["size"]))
        r["x_baseline"] = b["ms"] / r["ms"] if b is not None and "ms" in r else None


def torch_align(ids, E, block_m, out):
    """The alignment as ~15 torch launches (what the single-launch kernel replaced)."""
    flat = ids.reshape(-1)
    n, dev = flat.numel(), flat.device
    key = torch.where(flat < 0, E, flat)
    srt, order = torch.sort(key, stable=True)
    bounds = torch.searchsorted(srt, torch.arange(E + 1, device=dev, dtype=srt.dtype))
    counts = bounds[1:] - bounds[:-1]
    padded = (counts + block_m - 1) // block_m * block_m
    end = torch.cumsum(padded, 0)
    e = srt.long().clamp(max=E - 1)
    dest = torch.where(srt >= E, 0, (end - padded)[e] + torch.arange(n, device=dev) - bounds[e])
    out.sorted_ids.fill_(n)
    out.sorted_ids.scatter_reduce_(0, dest, torch.where(srt >= E, n, order).to(torch.int32), reduce="amin")
    owner = torch.searchsorted(end, torch.arange(out.expert_ids.numel(), device=dev) * block_m, right=True)
    out.expert_ids.copy_(torch.where(owner < E, owner, -1))
    out.expert_counts.copy_(counts)
    out.num_padded.copy_(end[-1:])


def _time(fn, args) -> dict:
    import triton

    fn()  # compile outside the timed region
    torch.cuda.synchronize()
    med, p20, p80 = triton.testing.do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms,
                                            quantiles=[0.5, 0.2, 0.8])
    return {"ms": med, "p20_ms": p20, "p80_ms": p80}


def bench_attention(seqs: int, positions: int, dtype, args) -> list[dict]:
    from pyengine.kernels.decode_attention import DecodeAttention

    h, kvh, d, bs = (DECODE_ATTN[k] for k in ("heads", "kv_heads", "head_dim", "block_size"))
    dev, blocks = torch.device("cuda"), -(-positions // bs)
    k_cache = torch.randn(seqs * blocks, bs, kvh, d, device=dev, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(seqs * blocks, device=dev).view(seqs, blocks).to(torch.int32)  # scattered
    slots = torch.arange(seqs, device=dev, dtype=torch.int32)
    lens = torch.full((seqs,), positions, device=dev, dtype=torch.int32)
    q = torch.randn(seqs, h, d, device=dev, dtype=dtype)
    attn, out = DecodeAttention(seqs, h, kvh, d, bs, blocks, dtype, dev), torch.empty_like(q)
    kc = torch.randn(seqs, kvh, positions, d, device=dev, dtype=dtype)  # SDPA: contiguous per sequence
    vc = torch.randn_like(kc)
    size = f"{seqs}x{positions}"
    common = dict(op="decode_attention", size=size, seqs=seqs, positions=positions,
                  kv_bytes=kv_bytes(seqs, positions, kvh, d, q.element_size()))
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kc, vc, enable_gqa=True)
    rows = [{**common, "provider": "triton", "splits": attn.splits[seqs],
             **_time(lambda: attn(q, k_cache, v_cache, table, slots, lens, out), args)}]
    try:
        rows.append({**common, "provider": "sdpa", **_time(sdpa, args)})
    except (RuntimeError, TypeError) as e:
        rows.append({**common, "provider": "sdpa", "error": f"{type(e).__name__}: {str(e)[:120]}"})
    return rows


def bench_align(T: int, k: int, E: int, block_m: int, args) -> list[dict]:
    from pyengine.kernels.moe_align import _moe_align_block_size, empty_alignment

    ids = torch.rand(T, E, device="cuda").argsort(dim=1)[:, :k].to(torch.int32).contiguous()
    bufs = empty_alignment(T * k, E, block_m, ids.device)
    common = dict(op="align", size=f"pairs={T * k} E={E} block_m={block_m}")
    return [{**common, "provider": "triton", **_time(lambda: _moe_align_block_size(ids, E, block_m, bufs), args)},
            {**common, "provider": "torch", **_time(lambda: torch_align(ids, E, block_m, bufs), args)}]


def run_decode(args, copy_rate: float, emit) -> list[dict]:
    dtype = dtypes.torch_dtype(args.dtype)
    rows = []
    for seqs in args.seqs:
        for positions in args.positions:
            rows += bench_attention(seqs, positions, dtype, args)
            torch.cuda.empty_cache()
    for case in ALIGN_CASES:
        rows += bench_align(*case, args)
    add_decode_ratios(rows)
    for r in rows:
        emit(add_kv_rate(r, copy_rate))
    return rows


def print_decode_rows(env, rows) -> None:
    from pyengine.report.tables import print_table

    fmt = lambda v, f: "-" if v is None else format(v, f)
    print(f"# gpu: {env['gpu']}; copy: {env['copy_gb_s']:.0f} GB/s device-to-device, this run")
    table = [[r["op"], r["size"], r["provider"], fmt(r.get("ms"), ".4f"), fmt(r.get("p20_ms"), ".4f"),
              fmt(r.get("p80_ms"), ".4f"), fmt(r.get("kv_gb_s"), ".0f"), fmt(r.get("pct_copy"), ".0f"),
              fmt(r.get("x_baseline"), ".2f"), r.get("error", "")[:40]] for r in rows]
    print_table("Decode path kernels", [("op", "left"), ("size", "left"), ("provider", "left"), "median ms",
                                        "p20", "p80", "K/V GB/s", "% copy", "x baseline", "note"], table)


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
    if args.decode:
        emit = (lambda r: print(json.dumps(r), flush=True)) if args.json else (lambda r: None)
        rows = run_decode(args, copy_rate, emit)
        if not args.json:
            print_decode_rows(env, rows)
        return 0
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
