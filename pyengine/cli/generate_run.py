"""`pyengine generate`, once its inputs are read: scale a seeded model for CPU, check the prompts and
the memory (the KV cache of prompt + new tokens included), start the ranks, report, write files."""

from __future__ import annotations

import json
import os
import sys

DUMP_FILES = ("generated.pt", "first_logits.pt", "spec.json")
"""What --dump writes (first_logits.pt when the first sequence's logits were kept)."""


def _prompts(args, spec):
    """The prompts: the file's, or seeded ones of the config's batch_size x seq_len."""
    from pyengine.model.weights import make_tokens

    return list(make_tokens(spec, args.seed))


def launch(args, spec, source, prompts) -> int:
    from pyengine.cli.fit import check_run_fits
    from pyengine.cli.run import _fault
    from pyengine.execute.generate_measure import GenerateOptions, PackedPrompts, generate_rank
    from pyengine.execute.launch import LaunchError, bind, check_backend, pick_backend, run_ranks
    from pyengine.execute.scaling import scale_for_cpu
    from pyengine.model.batch import Batch
    from pyengine.model.prompts import check_generation
    from pyengine.report.generate_summary import summarize_generation
    from pyengine.report.generate_view import print_generation
    from pyengine.schedule import build

    backend = pick_backend(spec.world_size, args.backend)
    check_backend(backend, spec.world_size)
    note = ""
    on_cpu = not backend.on_gpu()
    if on_cpu and not args.no_scale and source is None:
        spec, note = scale_for_cpu(spec)
    prompts = prompts if prompts is not None else _prompts(args, spec)
    check_generation(spec, prompts, args.max_new_tokens, field="--tokens")
    if spec.model.unreachable_eos:
        print(f"pyengine generate: note: eos_token_ids {list(spec.model.unreachable_eos)} lie outside the "
              f"vocabulary [0, {spec.model.vocab_size}): never drawn, so --max-new-tokens ends every sequence",
              file=sys.stderr)
    lengths = [int(p.numel()) for p in prompts]
    build(spec, batch=Batch.prefill(lengths, min(spec.schedule.micro_batches, sum(lengths)), False))
    decode_table = build(spec, batch=Batch.decode([max(lengths)] * len(lengths), spec.schedule.micro_batches))
    fault = _fault(args.inject_fault, decode_table) if args.inject_fault else None
    capacity = max(lengths) + args.max_new_tokens
    check_run_fits(spec, [spec], backend, capacity=capacity, reference=False, scaled=bool(note))
    _check_graphs(args.graphs, on_cpu)
    opts = GenerateOptions(PackedPrompts.of(prompts), args.max_new_tokens, warmup=args.warmup, seed=args.seed,
                           source=source, fault=fault, show_progress=not args.json, graphs=args.graphs)
    groups = spec.comm_groups()
    try:
        results = run_ranks(bind(generate_rank, spec, opts), spec.world_size, backend=backend, groups=groups,
                            timeout_s=spec.comm.timeout_s, job_timeout_s=spec.comm.timeout_s * 4 + 120)
    except LaunchError as e:
        print(f"pyengine generate: {e}", file=sys.stderr)
        return 1
    if results is None:  # a non-zero torchrun rank: rank 0 reports for everyone
        return 0
    weights = source.describe() if source is not None else f"seeded random weights (seed {args.seed})"
    summary = summarize_generation(spec, results, backend=backend, scaled=note, weights=weights)
    if args.json:
        print_json(summary)
    else:
        print_generation(summary)
    sys.stdout.flush()
    return 0 if _write(args, spec, results, backend) else 1


def _check_graphs(mode: str, on_cpu: bool) -> None:
    """--graphs on where the decode steps cannot be captured: refused before any rank starts."""
    import torch

    from pyengine.execute.graphs import GraphMode, decide
    from pyengine.model.kernel_path import kernel_path
    from pyengine.model.ops import ops_class

    device = torch.device("cpu" if on_cpu else "cuda")
    decide(GraphMode(mode), device, ops_class(kernel_path(device)))


def _write(args, spec, results, backend) -> bool:
    from pyengine.cli.paths import write_outputs
    from pyengine.report.generate_summary import whole_timeline

    out = next(r for r in results if r.sequences is not None)
    tl = whole_timeline(results)

    def trace() -> None:
        from pyengine.report.trace import write_trace

        write_trace(tl, args.trace)

    def png() -> None:
        from pyengine.report.gantt import write_gantt
        write_gantt(tl, args.png, title=f"pyengine generate ({backend.value}, measured)",
                    unit=backend.rank_unit)

    writes = [(flag, path, fn) for flag, path, fn in (
        ("--trace", args.trace, trace), ("--png", args.png, png),
        ("--dump", args.dump, lambda: write_dump(args.dump, spec, out))) if path]
    return len(write_outputs("generate", writes)) == len(writes)


def write_dump(target: str, spec, out) -> None:
    import torch

    from pyengine.cli.paths import fresh_dir

    with fresh_dir(target) as path:  # whole or not at all, even with runs side by side
        generated, first_logits, spec_file = DUMP_FILES
        torch.save([torch.tensor(s, dtype=torch.int64) for s in out.sequences], os.path.join(path, generated))
        if out.first_logits is not None:
            torch.save(torch.from_numpy(out.first_logits), os.path.join(path, first_logits))
        with open(os.path.join(path, spec_file), "w") as f:
            f.write(spec.to_json())


def print_json(summary) -> None:
    from pyengine.report.jsonable import to_jsonable

    print(json.dumps(to_jsonable(summary), indent=2))
    sys.stdout.flush()
