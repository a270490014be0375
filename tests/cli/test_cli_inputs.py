"""Bad input of every kind is refused with one line and exit 2 before any rank starts: numeric
flags, output paths, jobs that cannot fit in memory, a backend this machine lacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from helpers import TINY_CONFIG
from pyengine.cli.main import main
from pyengine.core.errors import ResourceError
from pyengine.core.spec import load_spec
from pyengine.execute.backends import Backend


@pytest.fixture
def no_ranks(monkeypatch):
    """Any attempt to start ranks fails the test: refusals must come first."""
    import pyengine.execute.launch as launch

    def refuse(*args, **kwargs):
        raise AssertionError("ranks were started")

    monkeypatch.setattr(launch, "run_ranks", refuse)


def _refused(capsys, *argv) -> str:
    assert main(list(argv)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and captured.out == "", captured.err
    assert "Traceback" not in captured.err
    return lines[0]


@pytest.mark.parametrize("flags,words", [
    (("--timeout", "nan"), "--timeout = nan: must be a finite number"),
    (("--timeout", "inf"), "--timeout = inf: must be a finite number"),
    (("--timeout", "1e400"), "--timeout = inf"),
    (("--timeout", "0"), "--timeout = 0.0: must be in [1, 86400] seconds per action"),
    (("--timeout", "0.001"), "below 1 s the ranks cannot even connect at start-up"),  # died blaming a rank
    (("--timeout", "0.999"), "must be in [1, 86400]"),
    (("--timeout", "1e-9"), "must be in [1, 86400]"),
    (("--timeout", "1e9"), "must be in [1, 86400]"),
    (("--iters", str(10**12)), "--iters = 1000000000000: must be in [1, 1000000]"),
    (("--iters", "0"), "--iters = 0"),
    (("--warmup", "-1"), "--warmup = -1"),
    (("--seed", "-1"), "--seed = -1"),
    (("--seed", str(2**70)), "--seed"),
    (("--micro-batches", str(10**30)), f"--micro-batches = {10**30}: is out of range"),  # the flag, named
    (("--micro-batches", "0"), "--micro-batches = 0: must be > 0"),
])
def test_bad_numbers_exit_2(capsys, no_ranks, flags, words):
    line = _refused(capsys, "run", "--config", TINY_CONFIG, *flags)
    assert line.startswith("pyengine run: ") and words in line


@pytest.mark.parametrize("flag,make,words", [
    ("--trace", lambda d: d / "missing" / "t.json", "does not exist"),
    ("--trace", lambda d: d, "is a folder"),
    ("--trace", lambda d: d / "t.txt", "unsupported extension: use .json"),
    ("--png", lambda d: d / "g.jpg", "unsupported extension: use .png"),
    ("--png", lambda d: d / "missing" / "g.png", "does not exist"),
    ("--png", lambda d: d / "afile" / "g.png", "is not a folder"),
    ("--dump", lambda d: d / "afile", "exists and is not a folder"),
    ("--dump", lambda d: d / "missing" / "out", "does not exist"),
])
def test_output_paths_are_checked_before_the_run(capsys, no_ranks, tmp_path, flag, make, words):
    (tmp_path / "afile").write_text("x")
    line = _refused(capsys, "run", "--config", TINY_CONFIG, flag, str(make(tmp_path)))
    assert line.startswith(f"pyengine run: bad option: {flag} = ") and words in line


@pytest.mark.parametrize("flag,name,words", [
    ("--png", "missing/g.png", "does not exist"),
    ("--trace", "t.csv", "unsupported extension"),
    ("--png", ".", "is a folder"),
])
def test_simulate_checks_paths_first(capsys, tmp_path, monkeypatch, flag, name, words):
    import pyengine.predict.simulate as sim

    monkeypatch.setattr(sim, "simulate", lambda *a, **k: pytest.fail("simulated before the check"))
    monkeypatch.chdir(tmp_path)
    line = _refused(capsys, "simulate", flag, name)
    assert line.startswith(f"pyengine simulate: bad option: {flag}") and words in line


def test_simulate_write_failure_after_the_work_is_one_line(capsys, tmp_path, monkeypatch):
    import pyengine.report.trace as trace

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trace, "write_trace", full_disk)
    assert main(["simulate", "--trace", str(tmp_path / "t.json"), "--png", str(tmp_path / "g.png")]) == 1
    captured = capsys.readouterr()
    assert "makespan" in captured.out
    assert captured.err.splitlines() == [f"pyengine simulate: could not write --trace {tmp_path / 't.json'}: "
                                         "No space left on device", f"wrote chart {tmp_path / 'g.png'}"]


def _huge_config(tmp_path, **model) -> str:
    d = load_spec(TINY_CONFIG).to_dict()
    d["model"].update(model)
    path = tmp_path / "huge.json"
    path.write_text(json.dumps(d))
    return str(path)


@pytest.mark.parametrize("backend", ["gloo", "local"])
def test_a_job_too_big_for_this_host_is_refused_before_ranks_start(capsys, no_ranks, tmp_path, backend):
    cfg = _huge_config(tmp_path, vocab_size=2**28, hidden_size=4096)  # ~4.4 TB of embeddings
    line = _refused(capsys, "run", "--config", cfg, "--backend", backend, "--no-scale")
    assert line.startswith("pyengine run: does not fit: ranks 0, 1, 2 needs ")
    assert "stage embed, output" in line and "available host memory (MemAvailable)" in line


def test_run_and_plan_give_one_memory_estimate_in_one_wording(capsys, no_ranks, tmp_path):
    """The weights `run` reports for a config it does not scale are `plan`'s figure, in the same
    words; a run scaled for CPU says that its sizes are the scaled model's, not the config's."""
    import re

    cfg = _huge_config(tmp_path, vocab_size=2_000_000_000)
    plain = _refused(capsys, "run", "--config", cfg, "--backend", "local", "--no-scale")
    assert main(["plan", "--config", cfg]) == 0
    plan_line = next(ln for ln in capsys.readouterr().out.splitlines() if "Memory: the largest GPU" in ln)
    weights = re.search(r"weights ([0-9.]+ [kMG]?B)", plan_line).group(1)
    assert f"= weights {weights} + activations " in plain and "scaled" not in plain
    scaled = _refused(capsys, "run", "--config", cfg, "--backend", "local")
    assert "these are the sizes of the model as scaled for CPU" in scaled and "--no-scale" in scaled


def test_nccl_uses_the_spec_gpu_memory_like_plan(tmp_path):
    """On GPUs the budget is hardware.gpu_memory_gb per rank, as in `plan`'s fit check."""
    from pyengine.cli.fit import check_run_fits
    from pyengine.predict.devices import PRESETS
    from pyengine.predict.resources import fits

    spec = load_spec(None)
    small = spec.replace(hardware={"gpu_memory_gb": 2})
    assert fits(spec, PRESETS["seed32g"]) and not fits(small, PRESETS["seed32g"])
    check_run_fits(spec, [spec], Backend.NCCL)
    with pytest.raises(ResourceError) as e:
        check_run_fits(small, [small], Backend.NCCL)
    text = str(e.value)  # rank 0 also holds the single-device reference: it is the first to overflow
    assert text.startswith("rank 0 (stage embed, output) needs ") and "weights" in text
    assert "reference" in text and "the budget is 2.00 GB of GPU memory per rank" in text


def test_the_run_needs_cover_every_variant_and_the_reference():
    from pyengine.cli.fit import run_needs
    from pyengine.execute.measure import STREAM_BATCHES, stream_spec, variants
    from pyengine.predict.devices import PRESETS
    from pyengine.predict.resources import memory_bytes

    spec, dev = load_spec(TINY_CONFIG), PRESETS["seed32g"]
    runs = list(variants(spec, True).values())
    needs = run_needs(spec, runs + [stream_spec(v, STREAM_BATCHES) for v in runs], dev)
    plain = memory_bytes(spec, dev)
    for n in needs:
        assert n.total >= plain[n.rank]  # never less than the plan's own figure
    assert needs[0].reference > 0 and needs[1].reference == needs[2].reference == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_nccl_without_a_gpu_is_one_line(capsys, no_ranks):
    line = _refused(capsys, "run", "--config", TINY_CONFIG, "--backend", "nccl")
    assert line == ("pyengine run: bad option: --backend = 'nccl': needs one CUDA GPU per rank (3); "
                    "no CUDA GPU is visible here (use --backend gloo or local)")


def test_version():
    r = subprocess.run([sys.executable, "-m", "pyengine", "--version"], capture_output=True, text=True,
                       timeout=60)
    import pyengine

    assert r.returncode == 0 and r.stdout.strip() == f"pyengine {pyengine.__version__}"


def test_bad_flags_from_the_shell_are_one_line_without_starting_anything():
    r = subprocess.run([sys.executable, "-m", "pyengine", "run", "--timeout", "nan", "--trace", "/x/t.json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr == "pyengine run: bad option: --timeout = nan: must be a finite number (NaN and Infinity are refused)\n"


def _seed_json_with(raw: bytes) -> bytes:
    return json.dumps(load_spec(None).to_dict()).encode().replace(b'"bfloat16"', raw)


@pytest.mark.parametrize("text,words", [
    (b"[" * 100_000 + b"]" * 100_000, "nested deeper than 32 levels"),
    (_seed_json_with(b'"\xff\xfe"'), "is not UTF-8"),
    (b'{"hardware": {"num_gpus": 3, "num_gpus": 3}}', "a key appears twice"),
    (_seed_json_with(b"NaN"), "NaN and Infinity are not numbers"),
    (_seed_json_with(b'"' + b"x" * 50_000_000 + b'"'), "model.dtype"),  # a 50 MB value
])
def test_bad_json_through_the_cli_is_one_short_line(capsys, no_ranks, tmp_path, text, words):
    cfg = tmp_path / "c.json"
    cfg.write_bytes(text)
    line = _refused(capsys, "run", "--config", str(cfg))
    assert line.startswith("pyengine run: invalid config: ") and words in line and len(line) < 300
