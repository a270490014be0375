"""`pyengine` command line: parses, calls the library, prints through pyengine.report.

Subcommands live with the code they drive; each module exposes `register(subparsers)`
and sets `func(args) -> int`. Bad input exits 2 with one line naming field, value and rule.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys
import threading

from pyengine.core import stop_signal
from pyengine.core.stop_signal import Terminated

# subcommand -> the module that registers it. Only the module of the command being run is
# imported, so `pyengine plan` does not pay for torch; `--help` imports them all.
_COMMANDS = {
    "run": "pyengine.cli.run",
    "generate": "pyengine.cli.generate",
    "serve": "pyengine.cli.serve",
    "plan": "pyengine.cli.plan",
    "simulate": "pyengine.cli.plan",
    "bench": "pyengine.cli.bench",
    "tune": "pyengine.cli.tune",
    "kernels": "pyengine.cli.kernels",
    "calibrate": "pyengine.cli.calibrate",
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from pyengine import __version__
    from pyengine.core.cli_help import Parser

    parser = Parser(
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


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_WITHOUT_RANKS = {"plan", "simulate", "kernels"}
"""Commands that start no rank: an interrupt of theirs stops no rank."""


@contextlib.contextmanager
def _stop_signals_raise():
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
        return

    def handler(signum, frame):
        for s in _STOP_SIGNALS:  # a second signal must not break the cleanup of the first
            signal.signal(s, signal.SIG_IGN)
        stop_signal.record(signum)  # raised again by the launchers' watch loops if this raise is lost
        raise Terminated(signum)

    previous = {s: signal.signal(s, handler) for s in _STOP_SIGNALS}
    try:
        yield
    finally:
        stop_signal.record(None)
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    as_program = argv is None
    argv = sys.argv[1:] if argv is None else argv
    with _stop_signals_raise():  # from the start: a signal during imports is handled too
        try:
            return _dispatch(argv)
        except KeyboardInterrupt as e:
            stop = e
        except Exception as e:  # a signal raised inside a C extension's import or callback
            stop = _interrupt_in(e)  # comes back wrapped (SystemError, ImportError ...)
            if stop is None:
                raise
        code = stop.code if isinstance(stop, Terminated) else 130
        print(_stopped_line(argv, stop), file=sys.stderr)
        del stop  # its traceback holds the stopped job's frames: the queues and semaphores that
        # _leave's collection must free (else the resource tracker reports them leaked)
    return _leave(code, as_program)


def _interrupt_in(e: BaseException) -> KeyboardInterrupt | None:
    """The interrupt (Ctrl-C, SIGTERM, SIGHUP) an error was raised while handling, if any."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, KeyboardInterrupt):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def _dispatch(argv: list[str]) -> int:
    from pyengine.core.errors import InputError

    from pyengine.core.cli_help import parse_error_line

    if not any(not a.startswith("-") for a in argv) and not {"-h", "--help", "--version"} & set(argv):
        sys.stderr.write(parse_error_line("pyengine", f"needs a command: one of {', '.join(dict.fromkeys(_COMMANDS))}"))
        return 2
    args, unknown = build_parser(argv).parse_known_args(argv)
    command = " ".join(filter(None, (args.command, getattr(args, "suite", None))))
    if unknown:  # the top parser would name itself, not the command that does not know them
        sys.stderr.write(parse_error_line(f"pyengine {command}", f"unrecognized arguments: {' '.join(unknown)}"))
        return 2
    try:
        return int(args.func(args) or 0)
    except InputError as e:
        print(f"pyengine {command}: {e.kind}: {e}", file=sys.stderr)
        return 2


def _stopped_line(argv: list[str], e: KeyboardInterrupt) -> str:
    words = [a for a in argv if not a.startswith("-")][:2]
    command = words[0] if words and words[0] in _COMMANDS else ""
    suite = f" {words[1]}" if command == "bench" and len(words) > 1 else ""
    what = f"terminated ({e.name})" if isinstance(e, Terminated) else "interrupted"
    ranks = "" if command in _WITHOUT_RANKS or not command else "; every rank stopped"
    return f"pyengine{' ' + command + suite if command else ''}: {what}{ranks}"


def _leave(code: int, as_program: bool) -> int:
    """After an interrupt the process leaves at once (as a program): native threads left
    (virtual ranks stuck in a kernel, torch's own) make a normal interpreter exit abort in
    C++ now and then ("terminate called without an active exception", exit -6). First the
    garbage of the stopped job is collected so multiprocessing's finalizers release its
    semaphores (else the resource tracker reports them leaked)."""
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    if as_program:
        os._exit(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
