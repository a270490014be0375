"""Help text shared by every command line (`pyengine ...` and `python -m pyengine.commbench`).

Defaults are shown by the formatter from the option itself, so a help line can never state a
default the code does not use; units belong in each option's own help."""

from __future__ import annotations

import argparse

TOKENS_HELP = ("token ids, integers in [0, vocab_size): a .pt tensor or a .npy array, [B, S] "
               "or [T] (one sequence)")
"""The --tokens formats of run, plan and generate (pyengine.model.tokens reads them all)."""


class DefaultsFormatter(argparse.HelpFormatter):
    """Appends '(default: X)' to every option whose default is a value: not None (a default
    decided later, which the help describes in words), not False (a plain switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or not shows_default(action):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def shows_default(action: argparse.Action) -> bool:
    default = action.default
    return (action.help is not argparse.SUPPRESS and action.option_strings != []
            and default is not None and default is not False and default != argparse.SUPPRESS
            and not isinstance(action, (argparse._HelpAction, argparse._VersionAction)))


class Parser(argparse.ArgumentParser):
    """ArgumentParser with DefaultsFormatter; its subparsers are Parsers too (argparse makes
    them of the parent's class), so one class here covers every subcommand. A parse error is one
    line and exit 2, as every other refusal is, not argparse's usage block above it."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, parse_error_line(self.prog, message))


def parse_error_line(prog: str, message: str) -> str:
    """`prog: bad option: <argparse's message> (see `prog --help`)`, on one line."""
    from pyengine.core.errors import one_line

    return f"{one_line(prog)}: bad option: {one_line(message)} (see `{prog} --help`)\n"
