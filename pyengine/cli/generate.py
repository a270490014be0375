"""`pyengine generate`: prefill every prompt, then greedy decode steps, on the best backend here.
Validates everything first (prompts, the model, the KV cache's memory), then starts the ranks."""

from __future__ import annotations

import argparse

from pyengine.core.cli_help import TOKENS_HELP
from pyengine.execute.backends import BACKEND_CHOICES, BACKEND_HELP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="greedy generation: prefill, then decode steps with a KV cache",
                       description="Prefills the prompts (chunked, micro-batches ping-ponging between the "
                                   "attention GPU and the expert GPUs), then decodes one token per live "
                                   "sequence per step, each sequence stopping at its end-of-sequence id "
                                   "or after --max-new-tokens.")
    p.add_argument("--config", help="deployment JSON of a model of layers (default with --weights: the "
                                    "packaged seed layout); batch_size and seq_len come from the prompts")
    p.add_argument("--weights", metavar="DIR", help="Hugging Face model folder: generate with the whole model")
    p.add_argument("--tokens", metavar="FILE", help=f"prompts: {TOKENS_HELP}, or a .pt list of 1-D id tensors "
                                                    "(any lengths) (default: seeded prompts of the config's "
                                                    "batch_size x seq_len)")
    p.add_argument("--max-new-tokens", type=int, required=True, metavar="N", help="new tokens per sequence at most")
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES, help=BACKEND_HELP)
    p.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations first")
    p.add_argument("--seed", type=int, default=0, help="seed of the seeded weights and prompts")
    p.add_argument("--micro-batches", type=int, help="override schedule.micro_batches (decode: groups of sequences; default: the config's)")
    p.add_argument("--schedule", choices=["gpipe", "asready"], help="override schedule.kind (default: the config's)")
    p.add_argument("--timeout", type=float, help="override comm.timeout_s: seconds per action (default: the config's)")
    p.add_argument("--no-scale", action="store_true", help="on CPU, run a seeded model at full size")
    p.add_argument("--graphs", default="auto", choices=["auto", "on", "off"],
                   help="capture the decode steps in CUDA graphs (auto: where the ranks run on a GPU with the "
                        "Triton kernels; the run says why not; on: refuse where they cannot)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--dump", help="write generated.pt (prompt + new ids per sequence), first_logits.pt "
                                  "(the first sequence's per-step logits) and spec.json here")
    p.add_argument("--trace", help="write a Perfetto/Chrome trace of the whole generation")
    p.add_argument("--png", help="write a Gantt chart (PNG) of the whole generation")
    p.add_argument("--inject-fault", default="", help=argparse.SUPPRESS)  # testing: RANK:ACTION:mode, decode only
    p.set_defaults(func=generate)


def _check_args(args) -> None:
    from pyengine.cli.generate_run import DUMP_FILES
    from pyengine.cli.paths import PNG_EXTENSIONS, TRACE_EXTENSIONS, check_apart, check_dir, check_file
    from pyengine.core.errors import UsageError
    from pyengine.core.limits import MAX_ITERS, MAX_SEED, MAX_TIMEOUT_S, MIN_TIMEOUT_S, TIMEOUT_WHY, check_number
    from pyengine.model.prompts import MAX_NEW_TOKENS

    check_number("--max-new-tokens", args.max_new_tokens, lo=1, hi=MAX_NEW_TOKENS, integer=True, error=UsageError)
    check_number("--warmup", args.warmup, lo=0, hi=MAX_ITERS, integer=True, error=UsageError)
    check_number("--seed", args.seed, lo=0, hi=MAX_SEED, integer=True, error=UsageError)
    if args.micro_batches is not None:
        check_number("--micro-batches", args.micro_batches, lo=1, hi=MAX_ITERS, integer=True, error=UsageError)
    if args.timeout is not None:
        check_number("--timeout", args.timeout, lo=MIN_TIMEOUT_S, hi=MAX_TIMEOUT_S, error=UsageError,
                     why=TIMEOUT_WHY)
    check_file("--trace", args.trace, TRACE_EXTENSIONS)
    check_file("--png", args.png, PNG_EXTENSIONS)
    check_dir("--dump", args.dump, DUMP_FILES)
    check_apart({"--trace": args.trace, "--png": args.png}, "--dump", args.dump, DUMP_FILES)


def _spec(args, source, prompts):
    """The spec with the flags that override the config, and batch_size / seq_len from the
    prompts (a config giving them must agree), checked once."""
    from pyengine.cli.config_arg import flag_blame, flagged_config
    from pyengine.core.errors import SpecError
    from pyengine.core.spec import DeploymentSpec

    if source is None and args.config is None:
        raise SpecError("--config", None, "needs a model of layers (e.g. pyengine/configs/seed_model_3gpu.json) "
                                          "or --weights DIR")
    data = flagged_config(args, layout_only=source is not None)
    shape = None if prompts is None else _shape(prompts)
    if shape is not None:
        if args.config is None and isinstance(data, dict):
            data["model"] = {}  # the default layout's batch shape yields to the prompts'
        _fewer_chunks(data, shape[0] * shape[1])
    try:
        if source is not None:
            from pyengine.model.hf_config import deployment_spec

            return deployment_spec(source.hf, data, whole=True, batch=shape)
        if shape is not None and isinstance(data, dict) and isinstance(data.get("model"), dict):
            for key, value in zip(("batch_size", "seq_len"), shape):
                if key in data["model"] and data["model"][key] != value:
                    raise SpecError(f"model.{key}", data["model"][key],
                                    f"disagrees with the prompts ({value}); leave it out")
                data["model"][key] = value
        return DeploymentSpec.from_dict(data)
    except SpecError as e:
        raise flag_blame(args, e) from None


def _fewer_chunks(data, tokens: int) -> None:
    """Prompts of fewer tokens (sequences x longest) than the config's micro-batches: the prefill
    runs in that many chunks instead (as decode runs fewer groups once fewer sequences are live),
    where the spec rule would have refused prompts shorter than the schedule."""
    from pyengine.core.spec import ScheduleSpec

    sched = data.get("schedule", {}) if isinstance(data, dict) else None
    if not isinstance(sched, dict):
        return  # the validation says what is wrong with it
    m = sched.get("micro_batches", ScheduleSpec().micro_batches)
    if isinstance(m, int) and not isinstance(m, bool) and m > tokens:
        data.setdefault("schedule", sched)["micro_batches"] = tokens


def _shape(prompts) -> tuple[int, int]:
    return len(prompts), max(int(p.numel()) for p in prompts)


def generate(args: argparse.Namespace) -> int:
    _check_args(args)
    source = prompts = None
    if args.weights:
        from pyengine.cli.checkpoint_arg import open_weights

        source = open_weights(args.weights)
    if args.tokens:
        from pyengine.model.tokens import load_prompts

        prompts = load_prompts(args.tokens)
    spec = _spec(args, source, prompts)
    from pyengine.cli.generate_run import launch

    return launch(args, spec, source, prompts)
