"""`pyengine` command line: parses, calls the library, prints through report.py.

Subcommands live with the code they drive; each module exposes `register(subparsers)`
and sets `func(args) -> int`. Bad input exits 2 with one line naming field, value and rule.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# module -> registers these subcommands (imported lazily: `pyengine plan` must not pay for torch)
_COMMANDS = (
    "pyengine.run_cli",       # run
    "pyengine.plan_cli",      # plan, simulate
    "pyengine.bench_cli",     # bench comm|kernels|pipeline
    "pyengine.tune_cli",      # tune
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pyengine",
        description="3-GPU hybrid tensor+pipeline parallel MoE engine: run, plan, simulate, benchmark.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue  # a subcommand module not present in this build
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from pyengine.spec import SpecError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SpecError as e:
        print(f"pyengine {args.command}: invalid config: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"pyengine {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
