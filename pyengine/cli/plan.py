"""`pyengine plan` and `pyengine simulate`: predictions for a config, without any GPU."""

from __future__ import annotations

import argparse
import sys

from pyengine.core.cli_help import TOKENS_HELP
from pyengine.predict.devices import DEFAULT_PRESET, PRESETS


DEFAULT_TOP = 10
"""Candidates `plan --search` shows unless --top says otherwise."""


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="predict per-GPU cost, check the seed's claims, search for better plans",
        description="Per-GPU FLOPs, memory, traffic and busy time; verdicts on the seed note's claims; "
                    "optionally a ranked search over micro-batches, stage maps, TP splits, boundaries, schedules.")
    _common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--search", action="store_true", help="also search alternatives and rank them")
    p.add_argument("--top", type=int, default=None, metavar="N",
                   help=f"candidates --search shows (default {DEFAULT_TOP})")
    p.add_argument("--rank-by", choices=("latency", "throughput"), default="latency",
                   help="order of the search table")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N",
                   help="a model of layers: decode steps to price after the prompts")
    p.set_defaults(func=_plan)

    s = subparsers.add_parser(
        "simulate", help="replay the schedule tables with roofline op costs; write a trace or a Gantt PNG",
        description="Event-driven replay of the schedule tables (compute and comm lanes per rank).")
    _common(s)
    s.add_argument("--schedule", choices=("gpipe", "asready"), default=None,
                   help="schedule kind (default: the config's)")
    s.add_argument("--png", metavar="F", help="write a Gantt chart (PNG)")
    s.add_argument("--trace", metavar="F", help="write a Chrome/Perfetto trace (JSON)")
    s.add_argument("--json", action="store_true", help="print the timeline and its metrics as JSON")
    s.set_defaults(func=_simulate)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="F", default=None, help="deployment JSON (default: the packaged seed)")
    p.add_argument("--hf-config", metavar="PATH", default=None,
                   help="Hugging Face config.json (or its model folder) of a Mixtral / Qwen3-MoE / OLMoE "
                        "model: sizes, top-k, eps, routing and dtype from it, the rest from --config")
    p.add_argument("--device", metavar="NAME|FILE", default=None,
                   help=f"device profile: {'|'.join(PRESETS)} or a JSON file with the same fields "
                        f"(default {DEFAULT_PRESET}: the seed's 32 GB GPUs)")
    p.add_argument("--weights", metavar="DIR", default=None,
                   help="Hugging Face model folder: plan the whole model, or decoder layer --layer (sizes from config.json; "
                        "with --routing measured, its router's real choices)")
    p.add_argument("--layer", type=int, default=None,
                   help="plan only this decoder layer of --weights / --hf-config, as the attention-free "
                        "MoE block (default: the whole model)")
    p.add_argument("--tokens", metavar="FILE", default=None,
                   help=f"{TOKENS_HELP}, for --routing measured (default: seeded tokens)")
    p.add_argument("--routing", choices=("uniform", "measured"), default="uniform",
                   help="what expert-parallel costs assume: uniform (T*k/E pairs per expert) or the "
                        "router's real choices (seeded weights, or --weights) on the batch's tokens; "
                        "runs only the router, on CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of the seeded weights and tokens, for --routing measured")


def _spec(args: argparse.Namespace, source=None):
    """(spec, one line on where the model came from: '' for the config's own model)."""
    from pyengine.core.spec import load_spec

    if args.hf_config is None and source is None:
        return load_spec(args.config), ""
    from pyengine.core.units import fmt_bytes
    from pyengine.model.hf_config import deployment_spec, read_hf_config

    hf = source.hf if source is not None else read_hf_config(args.hf_config)
    whole = args.layer is None
    if not whole:
        hf.check_layer(args.layer)
    spec = deployment_spec(hf, args.config, whole=whole)
    moe_layers = hf.num_layers - len(hf.dense_layers)
    attention = (f"MLA: {hf.num_attention_heads} heads, a cached latent of {hf.mla.latent_width} per token"
                 if hf.mla is not None else f"{hf.num_attention_heads} heads, {hf.num_key_value_heads} kv heads, "
                                            f"head_dim {hf.head_dim}")
    what = (f"the whole model: {hf.num_layers} layers, attention ({attention}) on the embed stage's GPU"
            if whole else f"MoE layer {args.layer} with the embedding and head (no attention)")
    return spec, (f"model: {hf.name} ({hf.family}, {hf.source}): H {hf.hidden_size}, F {hf.ffn_hidden_size}, "
                  f"{hf.num_experts} experts, top-{hf.top_k}, V {hf.vocab_size}, {hf.dtype}, "
                  f"renormalize {str(hf.renormalize).lower()}, eps {hf.norm_eps:g}. The plan is for {what}; "
                  f"all {moe_layers} MoE layers' experts alone hold {fmt_bytes(hf.all_experts_bytes())}")


def _inputs(args: argparse.Namespace):
    """(checkpoint source or None, token ids or None), every input checked before planning."""
    from pyengine.core.errors import UsageError

    if args.hf_config is not None and args.weights is not None:
        raise UsageError("--hf-config", args.hf_config, "give --hf-config or --weights, not both "
                                                        "(--weights reads the folder's config.json)")
    if args.layer is not None and args.weights is None and args.hf_config is None:
        raise UsageError("--layer", args.layer, "needs --weights or --hf-config (a layer of which model?)")
    if args.routing == "measured" and args.hf_config is not None and args.weights is None:
        raise UsageError("--routing", "measured", "needs router weights: --weights DIR (a config.json has none)")
    if args.tokens is not None and args.routing != "measured":
        raise UsageError("--tokens", args.tokens, "only feeds --routing measured")
    source = tokens = None
    if args.weights is not None:
        from pyengine.cli.checkpoint_arg import open_weights

        source = open_weights(args.weights, args.layer)  # no --layer: the whole model
    if args.tokens is not None:
        from pyengine.model.tokens import load_tokens

        tokens = load_tokens(args.tokens)
    return source, tokens


def _load(args: argparse.Namespace):
    from pyengine.predict.devices import load_profile

    source, tokens = _inputs(args)
    spec, model_note = _spec(args, source)
    if tokens is not None:
        from pyengine.model.tokens import check_ids

        spec = spec.replace(model={"batch_size": tokens.shape[0], "seq_len": tokens.shape[1]})
        check_ids(tokens, spec.model.vocab_size)
    dev = load_profile(args.device)
    if args.device is None:
        note = f" (default profile: the seed config's {spec.hardware.gpu_memory_gb:g} GB GPUs; datasheet-style assumptions)"
    else:
        note = " (chosen with --device)"
    if abs(dev.memory_gb - spec.hardware.gpu_memory_gb) > 0.5:
        note += (f"; note: profile memory {dev.memory_gb:g} GB, config hardware.gpu_memory_gb "
                 f"{spec.hardware.gpu_memory_gb:g} GB -- the fit check uses the config")
    return spec, dev, note, model_note, _routing(args, spec, source, tokens)


def _routing(args: argparse.Namespace, spec, source, tokens):
    """None (uniform) or the router's measured choices: torch is imported only for these."""
    if args.routing != "measured":
        return None
    if spec.model.layered:
        from pyengine.core.errors import UsageError

        raise UsageError("--routing", "measured", "measures one layer's router: add --layer N (the "
                                                  "whole model's routing needs a forward through every layer)")
    from pyengine.model.measured_routing import measure_routing
    from pyengine.model.weights import make_tokens

    ids = tokens if tokens is not None else make_tokens(spec, args.seed)
    return measure_routing(spec, source if source is not None else args.seed, ids)


def _plan(args: argparse.Namespace) -> int:
    from pyengine.predict import planner, search
    from pyengine.report import jsonable, plan_view, tables

    from pyengine.core.errors import UsageError
    from pyengine.core.limits import MAX_INT, check_number

    if args.top is not None and not args.search:  # silently ignored, it would look obeyed
        raise UsageError("--top", args.top, "needs --search (it limits the candidates shown)")
    args.top = DEFAULT_TOP if args.top is None else args.top
    check_number("--top", args.top, lo=1, hi=MAX_INT, integer=True, error=UsageError)
    check_number("--max-new-tokens", args.max_new_tokens, lo=1, hi=MAX_INT, integer=True, error=UsageError)
    spec, dev, note, model_note, routing = _load(args)
    m = spec.model
    if m.layered:  # the decode it prices must fit the model's positions, as generate's must
        from pyengine.model.prompts import past_positions

        if past_positions(m, m.seq_len, args.max_new_tokens):
            raise UsageError("--max-new-tokens", args.max_new_tokens,
                             f"the prompts' {m.seq_len} tokens (model.seq_len) + {args.max_new_tokens} new "
                             f"exceed the model's {m.max_positions} positions")
    p = planner.plan(spec, dev, routing, new_tokens=args.max_new_tokens)
    cands = search.search(spec, dev, rank_by=args.rank_by, routing=routing,
                                  show_progress=not args.json) if args.search else None
    if args.json:
        data = jsonable.to_jsonable(p)
        data["device_note"] = note.strip()
        if model_note:
            data["model_note"] = model_note
        if cands is not None:
            data["candidates"] = [jsonable.to_jsonable(c) for c in cands[:args.top]]
            data["candidates_total"] = len(cands)
            data["candidates_considered"] = cands.considered
        print(jsonable.to_json(data))
        return 0
    out = tables.console()
    if model_note:
        out.print(model_note, soft_wrap=True)
    plan_view.print_plan(p, note, out)
    if cands is not None:
        plan_view.print_candidates(cands, args.top, out)
        best = cands[0]
        out.print(f"Winner by {args.rank_by}: {best.label} -- {best.why}", soft_wrap=True)
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from pyengine.cli.paths import PNG_EXTENSIONS, TRACE_EXTENSIONS, check_apart, check_file, write_outputs
    from pyengine.core.units import fmt_pct, fmt_s
    from pyengine.predict.simulate import simulate
    from pyengine.report import gantt, jsonable, plan_view, tables, trace

    check_file("--trace", args.trace, TRACE_EXTENSIONS)  # before the work, not after it
    check_file("--png", args.png, PNG_EXTENSIONS)
    check_apart({"--trace": args.trace, "--png": args.png}, "--dump", None, ())
    spec, dev, note, model_note, routing = _load(args)
    if args.schedule is not None:
        spec = spec.replace(schedule={"kind": args.schedule})
    tl = simulate(spec, device=dev, routing=routing)
    title = (f"{spec.schedule.kind}, m={spec.schedule.micro_batches}, {spec.comm.boundary}, "
             f"{dev.name}: makespan {fmt_s(tl.makespan_s)}, bubble {fmt_pct(tl.bubble_fraction)}")
    writes = [(flag, path, fn) for flag, path, fn in (
        ("--trace", args.trace, lambda: trace.write_trace(tl, args.trace)),
        ("--png", args.png, lambda: gantt.write_gantt(tl, args.png, title))) if path]
    if args.json:
        data = tl.to_dict()
        data["device"] = dev.name
        data["schedule"] = spec.schedule.kind
        print(jsonable.to_json(data))
    else:
        out = tables.console()
        if model_note:
            out.print(model_note, soft_wrap=True)
        out.print(f"device profile: {dev.name}{note}", soft_wrap=True)
        plan_view.print_timeline(tl, f"Simulated {spec.schedule.kind} timeline", out)
    sys.stdout.flush()
    return 0 if len(write_outputs("simulate", writes)) == len(writes) else 1
