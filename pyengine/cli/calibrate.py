"""`pyengine calibrate`: measure this GPU and write a device profile (`--device FILE` reads it).

Glue only: the compute measurements are pyengine.execute.calibrate's, the links are timed by the
comm harness (pyengine.commbench, NCCL, with two or more GPUs), the fits and the profile are
pyengine.predict.calibration's, the file format pyengine.predict.devices'. Imports nothing
heavy at module level (the CLI imports every subcommand module to build its parser).
"""

from __future__ import annotations

import argparse
import json
import sys

from pyengine.execute.backends import Backend

LINK_SIZES = tuple(8 * 4 ** i for i in range(13))
"""Message sizes of the send/recv and all-reduce sweeps: 8 B to 128 MiB, x4."""
GPU_PRESETS = (("H200", "h200"), ("H100", "h100"))
"""GPU name substring -> the preset whose datasheet peaks it has (first match wins)."""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate", help="measure this GPU (HBM, GEMMs, this engine's expert kernels, launch, links); "
                          "write a device profile",
        description="Time HBM copies, dense bf16 GEMMs at several M, this engine's grouped expert GEMMs "
                    "at several rows per expert, the kernel launch cost and, with two or more GPUs, "
                    "send/recv and all-reduce vs size; fit the planner's numbers to them and write a "
                    "profile JSON with its machine, date, commit and command (pyengine plan --device FILE). "
                    "Needs a CUDA GPU.")
    p.add_argument("--out", metavar="FILE", default="device_profile.json",
                   help="profile JSON to write")
    p.add_argument("--base", metavar="PRESET", default=None,
                   help="preset whose datasheet peaks this GPU has (default: from the GPU's name)")
    p.add_argument("--config", metavar="F", default=None,
                   help="tensor-parallel deployment whose expert shard shape is timed (default: the seed)")
    p.add_argument("--interconnect", choices=("nvlink", "pcie"), default="nvlink",
                   help="what joins the GPUs the link figures describe")
    p.add_argument("--json", action="store_true", help="print the profile JSON instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pyengine.cli.paths import check_file
    from pyengine.core.errors import UsageError
    from pyengine.core.spec import load_spec
    from pyengine.predict.devices import PRESETS

    check_file("--out", args.out, (".json",))  # every input refused before anything is timed
    if args.base is not None and args.base not in PRESETS:
        raise UsageError("--base", args.base, f"must be one of {sorted(PRESETS)}")
    spec = load_spec(args.config)
    if spec.expert_parallel:
        raise UsageError("--config", args.config, "calibrate times the tensor-parallel expert shard; "
                                                  "give a tensor-parallel config")
    import torch

    if not torch.cuda.is_available():
        print("pyengine calibrate: needs a CUDA GPU (none is visible); run it on the machine the "
              "profile is to describe", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0)
    base = args.base or next((p for key, p in GPU_PRESETS if key in name), None)
    if base is None:
        raise UsageError("--base", None, f"{name} matches no preset; name the preset with its datasheet peaks")
    profile = _calibrate(spec, PRESETS[base], name, args.interconnect)
    data = profile.to_dict()
    try:
        with open(args.out, "w") as f:
            json.dump(data, f, indent=2)
    except OSError as e:
        print(f"pyengine calibrate: could not write --out {args.out}: {e.strerror}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        _print(profile, PRESETS[base], args.out)
    return 0


def _calibrate(spec, base, gpu: str, interconnect: str):
    import torch

    from pyengine.core import provenance
    from pyengine.execute.calibrate import measure_compute
    from pyengine.predict.calibration import calibrated_profile

    from pyengine.execute.calibrate_host import measure_host

    device = torch.device("cuda", 0)
    measured = measure_compute(spec, device)
    host = measure_host(device)
    count = torch.cuda.device_count()
    sendrecv = allreduce = ()
    if count >= 2:
        torch.cuda.empty_cache()  # the link ranks are separate processes: hand GPU 0's cached memory back
        sendrecv = _link("sendrecv", 2)
        allreduce = _link("all_reduce", count)
    record = provenance.record(device, "pyengine.cli.calibrate")
    prov = {"machine": f"{gpu} x {count}", "date": record["date"], "commit": record["commit"],
            "command": record["command"], "torch": record["torch"],
            "links": "measured" if count >= 2 else "published: one GPU, the link numbers are the base preset's"}
    return calibrated_profile(base, f"{base.name}-measured", spec.model.dtype, copy=measured.copy,
                              launch_s=measured.launch_s, dense=measured.dense, grouped=measured.grouped,
                              sendrecv=sendrecv, allreduce=allreduce, allreduce_gpus=count,
                              interconnect=interconnect, provenance=prov, host=host)


def _link(op: str, nranks: int, backend: Backend = Backend.NCCL, sizes: tuple[int, ...] = LINK_SIZES) -> list[tuple[float, float]]:
    """(bytes, seconds) per size of `op` over `nranks` GPUs, from the comm harness (NCCL; the
    tests run it on gloo)."""
    from pyengine.commbench.harness import BenchOptions, bench_rank, combine
    from pyengine.execute.launch import bind, run_ranks

    opts = BenchOptions(op=op, sizes=sizes, dtype="float32", iters=20, warmup=5, check=False, root=0, timeout_s=60.0)
    per_rank = run_ranks(bind(bench_rank, opts), nranks, backend=backend, groups=[tuple(range(nranks))],
                         timeout_s=opts.timeout_s, job_timeout_s=opts.timeout_s * (len(opts.sizes) + 2) + 60)
    return [(row["size"], row["time_us"] * 1e-6) for row in combine(per_rank, op, nranks)]


def _print(profile, base, path: str) -> None:
    from pyengine.predict.device_profile import number_fields
    from pyengine.report.tables import console, print_table

    out = console()
    changed = [f for f in number_fields() if profile.source(f) != base.source(f)]
    print_table(f"Measured on {profile.provenance.get('machine', '?')} (base {base.name})",
                [("number", "left"), "preset", "measured", ("source", "left")],
                [[f, f"{getattr(base, f):.4g}", f"{getattr(profile, f):.4g}", profile.source(f).ref] for f in changed], out)
    out.print(f"links: {profile.provenance.get('links', '')}", soft_wrap=True)
    out.print(f"wrote {path}: pyengine plan --device {path}", soft_wrap=True)
