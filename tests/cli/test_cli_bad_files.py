"""Hostile files and environments, refused in one line naming the flag (or variable) and the
value, exit 2, before any rank starts: empty, garbage and looping token files."""

from __future__ import annotations

import os

import pytest

from helpers import TINY_CONFIG, packaged_config
from pyengine.cli.main import main

MODEL = packaged_config("seed_model_3gpu.json")
COMMANDS = {"run": ("run", "--config", TINY_CONFIG),
            "generate": ("generate", "--config", MODEL, "--max-new-tokens", "2")}


@pytest.fixture
def no_ranks(monkeypatch):
    """Any attempt to start ranks fails the test: refusals must come first."""
    import pyengine.execute.launch as launch

    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("ranks were started"))


def refused(capsys, *argv: str) -> str:
    assert main(list(argv)) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and cap.out == "" and "Traceback" not in cap.err, cap.err
    return lines[0]


def _empty(path):
    path.write_bytes(b"")


def _garbage(path):
    path.write_bytes(b"not a torch file at all " * 8)


def _loop(path):
    os.symlink(path.name, path)  # a link to itself


def _folder(path):
    path.mkdir()


@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("name,make,words", [
    ("ids.npy", _empty, "is empty (0 bytes)"),
    ("ids.pt", _empty, "is empty (0 bytes)"),
    ("ids.pt", _garbage, "cannot be read as a torch file"),
    ("ids.npy", _garbage, "cannot be read as a .npy array"),
    ("ids.pt", _loop, "is a symlink loop"),
    ("ids.npy", _folder, "is a folder"),
])
def test_bad_token_files_are_one_line(tmp_path, capsys, no_ranks, command, name, make, words):
    path = tmp_path / name
    make(path)
    line = refused(capsys, *COMMANDS[command], "--tokens", str(path))
    assert "--tokens" in line and str(path) in line and words in line, line
    assert "weights_only" not in line  # never advise loading a file's arbitrary code
