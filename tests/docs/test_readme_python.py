"""Every ```python block of the README runs as written: each is a torchrun script (its first line
says how it is started), run here with 3 gloo processes from the repository root, a tiny
checkpoint built with transformers standing in for /models/<name>."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tiny_hf

ROOT = Path(__file__).resolve().parents[2]
CLIENT = "OpenAI(base_url"
"""The serving client example: a client of `pyengine serve`, run against it by test_serve_example."""
BLOCKS = [b for b in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
          if CLIENT not in b]
TORCHRUN = "# torchrun --standalone --nproc-per-node=3 "
EXPECT = {"forward.py": "rank 0: logits (2, 24, 101)", "checkpoint.py": "new ids: [["}


def test_every_readme_snippet_is_a_script_that_says_how_to_start_it():
    assert len(BLOCKS) >= 2
    assert all(b.startswith(TORCHRUN) for b in BLOCKS), [b.splitlines()[0] for b in BLOCKS]
    assert {b.splitlines()[0][len(TORCHRUN):].strip() for b in BLOCKS} == set(EXPECT)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("ckpt")
    tiny_hf.build("qwen3_moe", folder)
    return str(folder)


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_snippet_runs(i, checkpoint, tmp_path):
    script = re.sub(r"/models/[\w.-]+", checkpoint, BLOCKS[i])
    name = script.splitlines()[0][len(TORCHRUN):].strip()
    (tmp_path / name).write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", str(tmp_path / name)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo, as on CI
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert EXPECT[name] in r.stdout, r.stdout
