"""`pyengine` command line: parses, calls the library, prints through pyengine.report.

Subcommands live with the code they drive; each module exposes `register(subparsers)`
and sets `func(args) -> int`. Bad input exits 2 with one line naming field, value and rule.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading

# subcommand -> the module that registers it. Only the module of the command being run is
# imported, so `pyengine plan` does not pay for torch; `--help` imports them all.
_COMMANDS = {
    "run": "pyengine.cli.run",
    "generate": "pyengine.cli.generate",
    "plan": "pyengine.cli.plan",
    "simulate": "pyengine.cli.plan",
    "bench": "pyengine.cli.bench",
    "tune": "pyengine.cli.tune",
    "kernels": "pyengine.cli.kernels",
    "calibrate": "pyengine.cli.calibrate",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from pyengine import __version__

    parser = argparse.ArgumentParser(
        prog="pyengine",
        description="3-GPU hybrid tensor+pipeline parallel MoE engine: run, plan, simulate, benchmark.")
    parser.add_argument("--version", action="version", version=f"pyengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    first = next((a for a in (argv or []) if not a.startswith("-")), None)
    modules = [_COMMANDS[first]] if first in _COMMANDS else list(dict.fromkeys(_COMMANDS.values()))
    for name in modules:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a subcommand module not present in this build
        mod.register(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that every launcher's cleanup runs (children
    stopped, queues closed) exactly as on Ctrl-C."""


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    from pyengine.core.errors import InputError

    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "suite", None))))
    try:
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except InputError as e:
        print(f"pyengine {command}: {e.kind}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        terminated = isinstance(e, Terminated)
        print(f"pyengine {command}: {'terminated (SIGTERM)' if terminated else 'interrupted'}; "
              "every rank stopped", file=sys.stderr)
        return _leave(143 if terminated else 130)


def _leave(code: int) -> int:
    """After an interrupt, virtual ranks (threads) stuck in a kernel cannot be stopped; exiting
    the interpreter around them aborts in C++ ("terminate called without an active
    exception"), so leave at once when any is left. Otherwise return the code as usual."""
    if any(t.name.startswith("pyengine-") and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
