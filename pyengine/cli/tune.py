"""`pyengine tune`: benchmark the MoE GEMM configs on this GPU, write kernels/configs/*.json.

Imports nothing heavy at module level: the CLI imports every subcommand module to build
its parser, and `pyengine plan` must not pay for torch or triton.
"""

from __future__ import annotations

import argparse
import sys

from pyengine.core.dtypes import SHORT


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="tune the MoE kernels' tile configs on the local GPU",
        description="Benchmark every candidate config of the column (SwiGLU) and row (down) "
                    "MoE GEMMs at this deployment's expert shapes, and write the fastest per "
                    "token-count bucket to JSON files that the kernels load at run time.")
    p.add_argument("--config", metavar="F", default=None,
                   help="deployment spec JSON (default: the packaged seed, H=4096 F=14336 E=8 k=2 TP=2)")
    p.add_argument("--dtype", choices=sorted(SHORT.values()), default=None,
                   help="kernel dtype (default: the spec's model dtype)")
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 1024], metavar="T",
                   help="token counts to tune for (one M bucket each)")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="output folder (default: the installed pyengine/kernels/configs)")
    p.set_defaults(func=run)


def shard_sizes(spec) -> list[int]:
    """F_r of each experts-stage shard, exactly as the runtime launches them (spec.ffn_shards)."""
    return [end - start for _, start, end in spec.ffn_shards()]


def run(args: argparse.Namespace) -> int:
    import torch

    from pyengine.cli.paths import check_dir
    from pyengine.core.errors import UsageError
    from pyengine.core.limits import MAX_INT, check_number

    for t in args.tokens:  # flags first: bad input is refused the same way on any machine
        check_number("--tokens", t, lo=1, hi=MAX_INT, integer=True, error=UsageError)
    check_dir("--out", args.out)
    if not torch.cuda.is_available():
        print("pyengine tune: no CUDA device visible; tuning times kernels on the GPU they "
              "will run on (run it on that machine)", file=sys.stderr)
        return 2
    from pyengine.core.dtypes import canonical, torch_dtype
    from pyengine.core.spec import load_spec
    from pyengine.kernels import tune, tuning

    spec = load_spec(args.config)  # SpecError -> exit 2 in cli.main
    m = spec.model
    dtype = torch_dtype(canonical(args.dtype) if args.dtype else m.dtype)
    sizes = sorted(set(shard_sizes(spec)))
    out_dir = args.out or tuning.CONFIG_DIR
    print(f"tuning on {torch.cuda.get_device_name()}: dtype={dtype} E={m.num_experts} "
          f"H={m.hidden_size} F_r={sizes} k={m.top_k} T={args.tokens}")
    for f_r in sizes:
        for path in tune.tune(dtype=dtype, E=m.num_experts, H=m.hidden_size, F=f_r,
                                top_k=m.top_k, tokens=list(args.tokens), out_dir=out_dir):
            print(f"wrote {path}")
    return 0
