"""`pyengine run` as a user runs it: real processes, real failures, files it writes."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from helpers import TINY_CONFIG as CONFIG  # noqa: E402

pytestmark = pytest.mark.slow  # every test here spawns processes


def pyengine(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pyengine", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.slow
def test_run_reports_and_writes_artifacts(tmp_path):
    trace, png, dump = tmp_path / "t.json", tmp_path / "g.png", tmp_path / "dump"
    r = pyengine("run", "--config", CONFIG, "--iters", "2", "--warmup", "1", "--json",
                 "--trace", str(trace), "--png", str(png), "--dump", str(dump))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["backend"] == "gloo"
    assert set(out["variants"]) == {"pipeline", "no_overlap", "m1"}
    assert out["check"]["ok"] and out["check"]["wrong"] == 0
    p = out["variants"]["pipeline"]
    assert p["latency_p50_s"] > 0 and p["throughput_tokens_per_s"] > 0
    assert set(p["measured"]["busy"]) == {"0", "1", "2"}
    assert 0 <= p["measured"]["bubble_fraction"] <= 1
    assert {c["claim"] for c in out["claims"]} == {"latency_cut", "throughput_gain", "utilization"}
    cut = next(c for c in out["claims"] if c["claim"] == "latency_cut")
    assert cut["iterations"] == 2 and cut["spread"][0] <= cut["spread"][1]
    names = {e["name"] for e in json.loads(trace.read_text())["traceEvents"] if e.get("ph") == "X"}
    assert "s1.mb0.COMPUTE" in names and "s2.mb2.COMPUTE" in names
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tokens, logits = torch.load(dump / "tokens.pt"), torch.load(dump / "logits.pt")
    assert tokens.dtype == torch.int64 and tokens.shape == (2, 24)
    assert logits.shape == (2, 24, 101)
    assert json.loads((dump / "spec.json").read_text())["model"]["vocab_size"] == 101
    said = r.stderr.splitlines()  # stderr: stdout stays one JSON object
    assert [f"wrote trace {trace}", f"wrote chart {png}", f"wrote dump {dump}"] == [
        line for line in said if line.startswith("wrote ")]


@pytest.mark.slow
def test_run_table_shows_spreads_and_what_exposed_comm_sums():
    r = pyengine("run", "--config", CONFIG, "--iters", "3", "--warmup", "1")
    assert r.returncode == 0, r.stderr
    assert "summed over the ranks" in r.stdout  # the exposed comm column's footnote
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("seed claim")]
    assert len(lines) == 3 and all("p10–p90" in ln or "no spread" in ln for ln in lines), lines
    routing = next(ln for ln in r.stdout.splitlines() if ln.startswith("routing:"))
    assert "GPU" not in routing and "rank 1:" in routing  # a CPU run has ranks, not GPUs


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["exit", "hang"])
def test_dead_or_stuck_rank_ends_the_job_naming_it(mode):
    start = time.monotonic()
    r = pyengine("run", "--config", CONFIG, "--iters", "1", "--warmup", "0", "--no-baselines",
                 "--timeout", "4", "--inject-fault", f"1:s1.mb1.COMPUTE:{mode}", timeout=120)
    elapsed = time.monotonic() - start
    assert r.returncode == 1
    # the dead or stuck rank and its action are named, not the peer that noticed it
    how = "exited with code 17" if mode == "exit" else "stalled: no progress"
    assert r.stderr.startswith(f"pyengine run: rank 1 failed in action s1.mb1.COMPUTE: {how}"), r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert elapsed < 60, f"took {elapsed:.0f} s to notice a {mode} rank"


def test_bad_config_exits_2_before_any_rank_starts(tmp_path):
    bad = tmp_path / "bad.json"
    cfg = json.loads(open(CONFIG).read())
    cfg["parallel"]["stages"][1]["gpus"] = [1, 5]
    cfg["parallel"]["stages"][1]["shard_fractions"] = None
    bad.write_text(json.dumps(cfg))
    r = pyengine("run", "--config", str(bad))
    assert r.returncode == 2
    assert "parallel.stages[1].gpus" in r.stderr and "GPU 5 does not exist" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_bad_iters_is_a_clear_error():
    r = pyengine("run", "--config", CONFIG, "--iters", "0")
    assert r.returncode == 2 and "--iters = 0" in r.stderr and len(r.stderr.splitlines()) == 1
