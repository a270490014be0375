"""`pyengine serve`, once its flags are checked: the spec, the serving capacity and its memory check,
then the ranks (pyengine.serve.runner on every rank) until SIGTERM or a failure.

SIGTERM (or SIGHUP) here starts the drain: rank 0 admits nothing new and gives what runs --grace
seconds; the ranks then return and the command exits 0 when every request finished, 143 when some
had to be aborted. A second signal, or the drain overrunning its grace by DRAIN_BACKSTOP_S, stops
every rank at once (exit 143). A rank that fails ends the command with one line naming it (exit 1),
after the in-flight requests got their 503.
"""

from __future__ import annotations

import functools
import math
import os
import signal
import sys

DRAIN_BACKSTOP_S = 30.0
"""How long past --grace a drain may take before every rank is stopped regardless."""
FLAGS = {"slots": "--max-seqs", "capacity": "--max-model-len", "blocks": "--kv-blocks",
         "step_tokens": "--max-step-tokens"}


def _capacity(args, spec):
    from pyengine.core.errors import InputError, UsageError
    from pyengine.serve.engine_loop import ServeCapacity

    capacity = ServeCapacity(args.max_seqs, args.max_model_len, args.kv_blocks, args.max_step_tokens)
    try:
        return capacity, capacity.resolve(spec)
    except InputError as e:
        raise UsageError(FLAGS.get(e.field, e.field), e.value, e.rule) from None


def _spec(args, source, slots: int, step_tokens: int):
    """The model and layout with the flags that override the config, checked once; batch_size x
    seq_len are one step's tokens (the activations' size), whatever the config says of them."""
    from pyengine.cli.config_arg import flag_blame, flagged_config
    from pyengine.core.errors import SpecError
    from pyengine.core.spec import DeploymentSpec

    shape = (slots, max(1, math.ceil(step_tokens / slots)))
    data = flagged_config(args, layout_only=source is not None)
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        for key in ("batch_size", "seq_len"):
            data["model"].pop(key, None)
    try:
        if source is not None:
            from pyengine.model.hf_config import deployment_spec

            return deployment_spec(source.hf, data, whole=True, batch=shape)
        if isinstance(data, dict) and isinstance(data.get("model"), dict):
            data["model"].update(batch_size=shape[0], seq_len=shape[1])
        spec = DeploymentSpec.from_dict(data)
    except SpecError as e:
        raise flag_blame(args, e) from None
    if not spec.model.layered:
        raise SpecError("model.num_layers", None, "serve needs a model of layers (the attention-free "
                                                  "block has no sequence to continue)")
    return spec


def launch(args, source) -> int:
    import multiprocessing as mp

    from pyengine.cli.fit import check_run_fits
    from pyengine.execute.launch import LaunchError, bind, check_backend, pick_backend, run_ranks
    from pyengine.execute.scaling import scale_for_cpu
    from pyengine.serve.engine_loop import step_loop_setup
    from pyengine.serve.runner import ServeOptions, serve_rank

    slots = args.max_seqs
    step_guess = args.max_step_tokens or max(256, slots)
    spec = _spec(args, source, slots, step_guess)
    backend = pick_backend(spec.world_size, args.backend)
    check_backend(backend, spec.world_size)
    on_cpu = not backend.on_gpu()
    note = ""
    if on_cpu and source is None:
        spec, note = scale_for_cpu(spec)
    capacity, (tokens, _, _) = _capacity(args, spec)
    check_run_fits(spec, [spec], backend, capacity=tokens, reference=False, scaled=bool(note))
    if note:
        print(f"pyengine serve: {note}", file=sys.stderr)
    model = args.served_model_name or (os.path.basename(os.path.normpath(args.weights)) if args.weights
                                       else "pyengine")
    started: list = []
    drain = mp.get_context("spawn").Event()
    opts = ServeOptions(
        make_loop=functools.partial(step_loop_setup, spec=spec, source=source, seed=args.seed, capacity=capacity),
        host=args.host, port=args.port, model=model, tokenizer_dir=args.weights, grace_s=args.grace,
        timeout_s=spec.comm.timeout_s, drain=drain,
        on_started=None if backend.process_per_rank else started.append)
    with _drain_on_signals(drain, args.grace):
        try:
            results = run_ranks(bind(serve_rank, opts), spec.world_size, backend=backend, groups=spec.comm_groups(),
                                timeout_s=spec.comm.timeout_s, job_timeout_s=spec.comm.timeout_s * 4 + 120)
        except LaunchError as e:
            for running in started:  # same-process ranks: the server is still up; answer its clients
                running.frontend.fail(f"the engine failed: {e}")
                running.http.stop()
            print(f"pyengine serve: {e}", file=sys.stderr)
            return 1
    if results is None:  # a non-zero torchrun rank: rank 0 reports
        return 0
    root = results[0]
    if root.aborted:
        print(f"pyengine serve: stopped; {root.aborted} request(s) aborted when the {args.grace:g} s grace "
              "ran out", file=sys.stderr)
        return 128 + signal.SIGTERM
    print(f"pyengine serve: stopped; every request finished ({root.steps} steps)", file=sys.stderr)
    return 0


class _drain_on_signals:
    """While the ranks run: the first SIGTERM/SIGHUP/SIGINT (Ctrl-C) sets `drain`; a second one, or the drain
    running DRAIN_BACKSTOP_S past its grace, raises the CLI's Terminated (every rank stopped)."""

    def __init__(self, drain, grace_s: float):
        self.drain, self.grace_s = drain, grace_s
        self.previous: dict = {}

    def _handle(self, signum, frame) -> None:
        from pyengine.cli.main import Terminated

        if self.drain.is_set() or signum == signal.SIGALRM:
            raise Terminated(signal.SIGTERM if signum == signal.SIGALRM else signum)
        self.drain.set()
        signal.setitimer(signal.ITIMER_REAL, self.grace_s + DRAIN_BACKSTOP_S)

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGALRM):
                self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous:
            signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in self.previous.items():
            signal.signal(s, h)
