"""Every ```python block of docs/python_api.md runs as written, so the API docs cannot rot: a block
whose first line is a `# torchrun ...` command is saved to a file and started that way (3 gloo
processes); every other block runs in this process."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "python_api.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
TORCHRUN = "# torchrun --standalone --nproc-per-node=3 "
IN_PROCESS = [b for b in BLOCKS if not b.startswith(TORCHRUN)]
SCRIPTS = [b for b in BLOCKS if b.startswith(TORCHRUN)]


def test_the_doc_has_examples():
    assert len(IN_PROCESS) >= 3 and len(SCRIPTS) >= 1


@pytest.mark.parametrize("i", range(len(IN_PROCESS)))
def test_python_api_example_runs(i):
    exec(compile(IN_PROCESS[i], f"{DOC.name}[block {i}]", "exec"), {"__name__": "__doc_example__"})


@pytest.mark.slow
@pytest.mark.parametrize("i", range(len(SCRIPTS)))
def test_python_api_torchrun_script_runs(i, tmp_path):
    script = SCRIPTS[i]
    name = script.splitlines()[0][len(TORCHRUN):].strip()
    (tmp_path / name).write_text(script)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3", name]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}  # gloo, as on CI
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rank 0: logits (2, 24, 101) on cpu" in r.stdout, r.stdout
