"""The commands of the README and docs/ that use the shipped examples/ files run as written, on a
tiny checkpoint in place of /models/<name> (and a layer and a generation length it has), from a
fresh folder (what they write lands there, not in the repository)."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import tiny_hf

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(text: str) -> list[str]:
    """Lines starting `pyengine `, a trailing backslash joining the next line."""
    lines = text.replace("\\\n", " ").splitlines()
    return [line.split("#")[0].strip() for line in lines if line.startswith("pyengine ")]


COMMANDS = [c for doc in DOCS for c in _commands(doc.read_text()) if "examples/" in c]
FAST = {"run": ["--iters", "1", "--warmup", "0"], "generate": [], "plan": []}
SERVE_READY_S = 240


def test_the_readme_uses_the_examples():
    assert any("examples/layout.json" in c for c in COMMANDS)
    assert any("examples/ids.npy" in c for c in COMMANDS)


def test_the_ids_are_valid_for_the_layout_and_every_family():
    ids = np.load(ROOT / "examples" / "ids.npy")
    assert ids.dtype == np.int64 and ids.ndim == 2 and ids.min() >= 0
    assert ids.max() < tiny_hf.SIZES["vocab"]  # the smallest vocabulary any test model has
    model = json.loads((ROOT / "examples" / "layout.json").read_text())["model"]
    assert ids.shape == (model["batch_size"], model["seq_len"])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_hf.build("mixtral", folder)
    return str(folder)


def _runnable(command: str, checkpoint: str) -> list[str]:
    command = re.sub(r"/models/\S+", checkpoint, command)
    command = re.sub(r"(?<=\s)(examples|pyengine)/", lambda m: f"{ROOT}/{m.group(1)}/", command)  # from any folder
    command = re.sub(r"--layer \d+", "--layer 1", command)
    command = re.sub(r"--max-new-tokens \d+", "--max-new-tokens 3", command)
    command = re.sub(r"--port \d+", "--port 0", command)  # a free port: tests never take a fixed one
    words = shlex.split(command)[1:]
    return [sys.executable, "-m", "pyengine", *words, *FAST.get(words[0], [])]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_doc_command_runs(command, checkpoint, tmp_path):
    if command.startswith("pyengine serve"):
        return _serves(_runnable(command, checkpoint), tmp_path)
    r = subprocess.run(_runnable(command, checkpoint), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{command}\n{r.stderr[-2000:]}"


def _serves(cmd: list[str], cwd: Path) -> None:
    """A server command runs until stopped: it must say it listens, then exit 0 on SIGTERM."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=SERVE_READY_S) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
