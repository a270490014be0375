"""`pyengine serve`: an OpenAI-compatible server (continuous batching over the paged KV cache) on the
best backend here. Every flag and the model are checked first (one line, exit 2); then the ranks
start, the scheduling rank (0) listens, and the line `pyengine serve: listening on http://HOST:PORT`
says it is ready."""

from __future__ import annotations

import argparse
import ipaddress


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible server: continuous batching, streaming, /metrics",
                       description="Serves /v1/completions, /v1/chat/completions (with a tokenizer's chat "
                                   "template), /v1/models, /health and /metrics. Requests are admitted into "
                                   "KV-cache blocks and run in steps that mix decode tokens with chunked "
                                   "prefill; rank 0 schedules and listens, the other ranks follow its plans. "
                                   "SIGTERM stops admissions, lets what runs finish within --grace seconds "
                                   "(exit 0), then aborts the rest (exit 143).")
    p.add_argument("--weights", metavar="DIR", help="Hugging Face model folder (its tokenizer, when it has one, "
                                                    "lets prompts be text)")
    p.add_argument("--config", help="deployment JSON: the layout (default with --weights: the packaged seed "
                                    "layout); without --weights, a model of layers with seeded weights")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (an IP address or localhost)")
    p.add_argument("--port", type=int, default=8000, help="TCP port (0: any free port, printed when ready)")
    p.add_argument("--backend", default="auto", choices=["auto", "nccl", "local", "gloo"],
                   help="where the ranks run: auto = nccl with a GPU per rank, local (threads) on one GPU, gloo on CPU")
    p.add_argument("--served-model-name", metavar="NAME",
                   help="the model name /v1/models lists (default: the --weights folder's name, else 'pyengine')")
    p.add_argument("--max-seqs", type=int, default=8, metavar="N", help="sequences in the KV cache at once")
    p.add_argument("--max-model-len", type=int, metavar="N",
                   help="tokens per sequence, prompt + new (default: the model's positions, else 2048)")
    p.add_argument("--kv-blocks", type=int, metavar="N", help="KV blocks of 16 tokens in all (default: every "
                                                              "sequence at --max-model-len; fewer pages them)")
    p.add_argument("--max-step-tokens", type=int, metavar="N",
                   help="tokens one step feeds, decode and prefill chunks together (default: max(256, --max-seqs))")
    p.add_argument("--grace", type=float, default=30.0, metavar="S",
                   help="seconds that running requests get to finish after SIGTERM")
    p.add_argument("--seed", type=int, default=0, help="seed of the seeded weights (without --weights)")
    p.add_argument("--micro-batches", type=int, help="override schedule.micro_batches (default: the config's)")
    p.add_argument("--timeout", type=float, help="override comm.timeout_s: seconds per action (default: the config's)")
    p.set_defaults(func=serve, schedule=None)


def check_args(args) -> None:
    from pyengine.core.errors import UsageError
    from pyengine.core.limits import MAX_INT, MAX_SEED, MAX_TIMEOUT_S, MIN_TIMEOUT_S, check_number

    check_host(args.host)
    check_number("--port", args.port, lo=0, hi=65535, integer=True, error=UsageError)
    check_number("--max-seqs", args.max_seqs, lo=1, hi=4096, integer=True, error=UsageError)
    for flag, value, lo in (("--max-model-len", args.max_model_len, 2), ("--kv-blocks", args.kv_blocks, 1),
                            ("--max-step-tokens", args.max_step_tokens, args.max_seqs)):
        if value is not None:
            check_number(flag, value, lo=lo, hi=MAX_INT, integer=True, error=UsageError)
    check_number("--grace", args.grace, lo=0, hi=MAX_TIMEOUT_S, error=UsageError)
    check_number("--seed", args.seed, lo=0, hi=MAX_SEED, integer=True, error=UsageError)
    if args.micro_batches is not None:
        check_number("--micro-batches", args.micro_batches, lo=1, hi=4096, integer=True, error=UsageError)
    if args.timeout is not None:
        check_number("--timeout", args.timeout, lo=MIN_TIMEOUT_S, hi=MAX_TIMEOUT_S, error=UsageError)
    if args.weights is None and args.config is None:
        raise UsageError("--weights", None, "serve needs a model: --weights DIR, or --config F of a model of layers")


def check_host(host: str) -> None:
    from pyengine.core.errors import UsageError

    if host == "localhost":
        return
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise UsageError("--host", host, "must be an IP address (127.0.0.1, 0.0.0.0, ::1) or localhost") from None


def serve(args: argparse.Namespace) -> int:
    check_args(args)
    source = None
    if args.weights:
        from pyengine.cli.checkpoint_arg import open_weights

        source = open_weights(args.weights)
    from pyengine.cli.serve_run import launch

    return launch(args, source)
