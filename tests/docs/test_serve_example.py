"""The README's third command (`pyengine serve ...`) and its client example, run as written: the
server on a free loopback port in place of 8000, the example against it, then SIGTERM (exit 0)."""

from __future__ import annotations

import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def serve_command() -> list[str]:
    line = next(line for line in README.splitlines() if "&& pyengine serve" in line)
    words = shlex.split(line.split("&&", 1)[1].split("#")[0])
    assert words[:2] == ["pyengine", "serve"] and "--port" in words
    words[words.index("--port") + 1] = "0"  # a free port: tests never take a fixed one
    return [sys.executable, "-m", "pyengine", *words[1:]]


def client_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    return next(b for b in blocks if "OpenAI(base_url" in b)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_readme_serve_command_answers_its_client_example():
    proc = subprocess.Popen(serve_command(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() is not None else line
        port = line.split("127.0.0.1:")[1].split()[0]
        code = client_example().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        ids = out.stdout.split()
        assert len(ids) == 8 and all(i.isdigit() for i in ids)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
