"""Every option's help states its default (from the option itself, so it cannot drift), and
the token-file options of run, plan and generate describe the same formats."""

import argparse

import pytest

from pyengine.cli.main import build_parser
from pyengine.core.cli_help import TOKENS_HELP, Parser


def _parsers(parser: argparse.ArgumentParser, name: str = "pyengine"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from _parsers(sub, f"{name} {sub_name}")


def _options():
    for name, parser in _parsers(build_parser()):
        for action in parser._actions:
            if action.option_strings and action.help is not argparse.SUPPRESS:
                yield name, parser, action


ALL = list(_options())


def test_every_subcommand_is_walked():
    names = {name for name, _, _ in ALL}
    for expected in ("run", "generate", "plan", "simulate", "bench comm", "kernels compile",
                     "calibrate", "tune"):
        assert f"pyengine {expected}" in names


@pytest.mark.parametrize("name,parser,action", ALL,
                         ids=[f"{n}:{a.option_strings[-1]}" for n, _, a in ALL])
def test_a_set_default_is_in_the_help(name, parser, action):
    if action.default in (None, False, argparse.SUPPRESS) or isinstance(
            action, (argparse._HelpAction, argparse._VersionAction)):
        return
    text = parser._get_formatter()._expand_help(action)
    assert f"default: {action.default}" in text, f"{name} {action.option_strings}: {text!r}"


def test_every_command_line_uses_the_formatter():
    assert all(isinstance(p, Parser) for _, p in _parsers(build_parser()))


def test_token_files_are_described_once():
    helps = {name: a.help for name, _, a in ALL if "--tokens" in a.option_strings}
    for name in ("pyengine run", "pyengine plan", "pyengine simulate", "pyengine generate"):
        assert TOKENS_HELP in helps[name]


def test_profile_says_it_does_nothing_on_cpu():
    (profile,) = [a for name, _, a in ALL if name == "pyengine run" and "--profile" in a.option_strings]
    assert "no effect on CPU" in profile.help


@pytest.mark.parametrize("argv,line", [
    ([], "pyengine: bad option: needs a command: one of run, generate, serve, plan, simulate, bench, tune, "
         "kernels, calibrate (see `pyengine --help`)"),
    (["run", "--bogus"], "pyengine run: bad option: unrecognized arguments: --bogus (see `pyengine run --help`)"),
    (["bench", "comm", "--bogus", "1"],
     "pyengine bench comm: bad option: unrecognized arguments: --bogus 1 (see `pyengine bench comm --help`)"),
    (["generate"], "pyengine generate: bad option: the following arguments are required: --max-new-tokens "
                   "(see `pyengine generate --help`)"),
    (["generate", "--max-new-tokens", "1e3"], "pyengine generate: bad option: argument --max-new-tokens: "
                                              "invalid int value: '1e3' (see `pyengine generate --help`)"),
    (["plan", "--device"], "pyengine plan: bad option: argument --device: expected one argument "
                           "(see `pyengine plan --help`)"),
])
def test_parse_errors_are_one_line_and_exit_2(capsys, argv, line):
    """As every other refusal: one line naming the option, no usage block above it."""
    from pyengine.cli.main import main

    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    cap = capsys.readouterr()
    assert code == 2 and cap.out == ""
    assert cap.err.splitlines() == [line], cap.err
