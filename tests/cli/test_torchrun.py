"""`torchrun --standalone --nproc-per-node=3 -m pyengine run --backend gloo`, as the README gives
it: the default config, one whose logits exceed the rendezvous store's 8 MB message cap (results
travel through the process group, not the store), and a rank killed under torchrun."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec

STORE_CAP = 8 * 1024 * 1024  # TCPStore's largest payload: "Invalid payload size: ..., max: 8388608"


def _torchrun(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=3",
           "-m", "pyengine", "run", "--backend", "gloo", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _left_behind(marker: str) -> list[str]:
    """Processes whose command line still names `marker` (a path unique to one test)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    out.append(pid)
        except OSError:
            continue
    return out


@pytest.mark.slow
def test_default_config_under_torchrun():
    r = _torchrun("--iters", "2", "--warmup", "1", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)  # only rank 0 prints
    assert out["check"]["ok"] and out["check"]["wrong"] == 0 and out["backend"] == "gloo"
    assert "Invalid payload size" not in r.stderr


@pytest.mark.slow
def test_logits_larger_than_the_store_cap_under_torchrun(tmp_path):
    d = load_spec(TINY_CONFIG).to_dict()
    d["model"]["vocab_size"] = 50_000  # 2 x 24 tokens x 50k x fp32 = 9.6 MB of logits
    m = d["model"]
    assert m["batch_size"] * m["seq_len"] * m["vocab_size"] * 4 > STORE_CAP
    cfg = tmp_path / "big_logits.json"
    cfg.write_text(json.dumps(d))
    r = _torchrun("--config", str(cfg), "--iters", "1", "--warmup", "0", "--no-baselines", "--json")
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["check"]["ok"] and out["check"]["elements"] == 2 * 24 * 50_000


@pytest.mark.slow
def test_a_rank_killed_under_torchrun_is_named(tmp_path):
    cfg = tmp_path / "killed_under_torchrun.json"
    shutil.copy(TINY_CONFIG, cfg)
    start = time.monotonic()
    r = _torchrun("--config", str(cfg), "--iters", "2", "--warmup", "0", "--timeout", "10",
                  "--inject-fault", "1:s1.mb1.COMPUTE:exit")
    elapsed = time.monotonic() - start
    assert r.returncode != 0
    cause = r.stderr.split("Root Cause (first observed failure):", 1)[-1]
    assert "rank      : 1 (local_rank: 1)" in cause and "exitcode  : 17" in cause, r.stderr[-3000:]
    for peer in (0, 2):  # the survivors say they stopped on a peer; none claims to be the cause
        assert f"pyengine run: rank {peer} failed" not in r.stderr
    assert elapsed < 90
    time.sleep(0.5)
    assert _left_behind(str(cfg)) == []
