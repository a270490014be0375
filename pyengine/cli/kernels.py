"""`pyengine kernels compile`: compile every Triton kernel for a GPU arch, report resources.

Glue only: the library is pyengine.kernels.compile_jobs / compile_check. Imports nothing
heavy at module level (the CLI imports every subcommand module to build its parser).
"""

from __future__ import annotations

import argparse
import sys

from pyengine.core.dtypes import SHORT


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "kernels", help="check the Triton kernels: compile them for a GPU without one",
        description="Tools for the Triton kernels of pyengine.kernels.")
    sub = p.add_subparsers(dest="kernels_command", required=True, metavar="ACTION")
    c = sub.add_parser(
        "compile", help="compile every kernel and config for a GPU arch; report resources",
        description="Compile every Triton kernel at this deployment's shapes (per-rank F "
                    "shards, micro-batch token counts, top-k) for a GPU architecture, on "
                    "this machine (no GPU needed), with the configs the engine would pick. "
                    "Reports shared memory, registers, spills and MMA kind per (kernel, "
                    "dtype, config); exits 1 if a config that can run does not compile, "
                    "exceeds shared memory or spills in bf16/fp16.")
    c.add_argument("--arch", type=int, default=90, metavar="SM",
                   help="compute capability as one number: 90 (Hopper), 100 (Blackwell)")
    c.add_argument("--config", metavar="F", default=None,
                   help="deployment spec JSON (default: the packaged seed)")
    c.add_argument("--dtype", nargs="+", choices=sorted(SHORT.values()), default=None,
                   help="kernel dtypes (default: the spec's model dtype)")
    c.add_argument("--all-configs", action="store_true",
                   help="also every autotune candidate (pruned ones are reported, not failed)")
    c.add_argument("--gpu", metavar="NAME", default=None,
                   help="GPU name whose tuned files apply (default: the arch's reference GPU)")
    c.add_argument("--workers", type=int, default=None, metavar="N",
                   help="compile processes (default: one per core)")
    c.add_argument("--json", action="store_true", help='print {"meta": ..., "rows": [...]}')
    c.set_defaults(func=run)


def shapes_from_spec(spec):
    """The one place the compile check reads a deployment's kernel shapes. A TP deployment
    also decodes (pyengine generate): its expert GEMMs at decode token counts are compiled
    with the decode tiles."""
    from pyengine.kernels.compile_jobs import Shapes
    from pyengine.kernels.decode_configs import DECODE_TOKENS

    from pyengine.model.boundaries import boundary_of
    from pyengine.model.stages import StageKind, stages_of

    m = spec.model
    gemm = dict(expert_bias=m.expert_bias, clamped=m.clamped_swiglu is not None)
    experts = stages_of(spec)[StageKind.EXPERTS]
    partials = boundary_of(spec).output_reads(len(experts.ranks))
    if spec.expert_parallel:  # whole local experts, one (token, expert) pair per row: top-1 form
        pairs = {max(1, round(experts.pairs_for(r, t))) for r in experts.ranks for t in spec.micro_batch_sizes()}
        return Shapes(E=max(len(p) for p in spec.expert_placement()), H=m.hidden_size, top_k=1,
                      ffn_shards=(m.ffn_hidden_size,), tokens=tuple(sorted(pairs)), num_partials=partials,
                      norm_tokens=tuple(spec.micro_batch_sizes()),  # the output stage sees every token
                      decode=decode_shapes_from_spec(spec), **gemm)
    return Shapes(E=m.num_experts, H=m.hidden_size, top_k=m.top_k,
                  ffn_shards=tuple(end - start for _, start, end in spec.ffn_shards()),
                  tokens=tuple(spec.micro_batch_sizes()), num_partials=partials,
                  decode_tokens=DECODE_TOKENS, decode=decode_shapes_from_spec(spec), **gemm)


def decode_shapes_from_spec(spec):
    """The decode path's kernel shapes (attention, q/k norm + RoPE + cache write, router): the
    spec's own attention, or, for a spec without attention (the block), the packaged seed
    model's (seed_model_3gpu: 32 heads, 8 kv heads, d 128), so the default check compiles
    the decode kernels too."""
    from pyengine.core.spec import load_spec
    from pyengine.kernels.compile_jobs_decode import DEFAULT_BLOCK_SIZE, DecodeShapes

    m = spec.model if spec.model.layered else load_spec("seed_model_3gpu").model
    return DecodeShapes(hidden=m.hidden_size, heads=m.heads, kv_heads=m.kv_heads,
                        head_dim=m.head_size, block_size=DEFAULT_BLOCK_SIZE,
                        max_positions=m.max_positions or max(m.seq_len, 4096),
                        E=m.num_experts, top_k=m.top_k, qk_norm=m.qk_norm)


def run(args: argparse.Namespace) -> int:
    from pyengine.kernels import compile_check, compile_jobs, smem
    from pyengine.core.spec import load_spec

    if args.arch not in smem.SHARED_LIMIT:
        return _usage(f"--arch {args.arch}: must be one of {sorted(smem.SHARED_LIMIT)}")
    if args.workers is not None and args.workers < 1:
        return _usage(f"--workers {args.workers}: must be >= 1")
    spec = load_spec(args.config)  # SpecError -> exit 2 in cli.main
    dtypes = args.dtype or [SHORT[spec.model.dtype]]
    gpu = args.gpu or compile_jobs.REFERENCE_GPU.get(args.arch, f"sm_{args.arch}")
    try:  # a malformed PYENGINE_MOE_*_CONFIG pin is a ValueError naming it
        jobs = compile_jobs.build_jobs(shapes_from_spec(spec), dtypes, args.arch, gpu, args.all_configs)
    except ValueError as e:
        return _usage(str(e))
    from pyengine.core.progress import progress

    try:
        with progress(len(jobs), "kernels compile: jobs", not args.json) as advance:
            rows = compile_check.run_jobs(jobs, args.arch, args.workers, advance=advance)
    except compile_check.ArchUnsupported as e:
        return _usage(f"--arch {args.arch}: {e}")
    failed = compile_check.gate_failures(rows)
    if args.json:
        print(_json({"meta": _meta(args, gpu, dtypes), "rows": rows}))
    else:
        _print(rows, args.arch, gpu, failed)
    return 1 if failed else 0


def _meta(args, gpu: str, dtypes: list[str]) -> dict:
    import torch
    import triton

    from pyengine.core import provenance
    from pyengine.kernels import smem
    from pyengine.kernels.compile_target import ptxas_version

    return {**provenance.record(torch.device("cpu")), "triton": triton.__version__,
            "ptxas": ptxas_version(args.arch), "arch": args.arch, "shared_limit_bytes": smem.shared_limit(args.arch), "gpu": gpu,
            "config": args.config or "seed_3gpu.json", "dtypes": dtypes,
            "all_configs": args.all_configs}


def _print(rows: list[dict], arch: int, gpu: str, failed: list[dict]) -> None:
    from pyengine.report.tables import print_table
    from pyengine.kernels import smem

    cols = [("kernel", "left"), ("variant", "left"), "dtype", ("config", "left"), ("source", "left"),
            ("shapes", "left"), "shared", "regs", "spill", "mma", "ok", ("reason / notes", "left")]
    table = [(r["kernel"].strip("_").removesuffix("_kernel"), r["variant"], r["dtype"], config_text(r["config"]), r["source"], "; ".join(r["shapes"]),
              _n(r["shared_bytes"]), _n(r["registers"]), _n(r["spill_bytes"]), r["mma"] or "-",
              "yes" if r["ok"] else ("pruned" if r["pruned"] else "NO"),
              r["reason"] or r["notes"]) for r in rows]
    print_table(f"Triton kernels compiled for sm_{arch} ({gpu}); shared-memory limit "
                       f"{smem.shared_limit(arch)} B per block", cols, table)
    print(f"{len(rows)} compiled, {len(failed)} failing" + ("" if not failed else
          ": " + "; ".join(f"{r['kernel']} {r['dtype']} {config_text(r['config'])}" for r in failed)))
    print("kernel = _<name>_kernel in pyengine.kernels; shared = static + dynamic bytes per block; "
          "regs per thread; spill = spill-store bytes per thread")


def config_text(cfg: dict) -> str:
    """64x128x64 g8 w8 s3 for a GEMM tile; w16 for launch options only."""
    if "BLOCK_M" in cfg:
        return (f"{cfg['BLOCK_M']}x{cfg['BLOCK_N']}x{cfg['BLOCK_K']} g{cfg['GROUP_M']} "
                f"w{cfg['num_warps']} s{cfg['num_stages']}")
    return " ".join(f"{k.removeprefix('num_')[0]}{v}" for k, v in cfg.items())


def _n(v) -> str:
    return "-" if v is None else str(v)


def _json(obj) -> str:
    from pyengine.report.jsonable import to_json

    return to_json(obj)


def _usage(msg: str) -> int:
    print(f"pyengine kernels compile: {msg}", file=sys.stderr)
    return 2
