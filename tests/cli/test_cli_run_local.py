"""`pyengine run --backend local` in this process (virtual ranks are threads): the output check
fails non-finite logits with a non-zero exit, and a file that cannot be written after the run
leaves the printed results standing, with one line for the failure."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import TINY_CONFIG
from pyengine.cli.main import main
from pyengine.execute.check import check_logits

QUICK = ("run", "--config", TINY_CONFIG, "--backend", "local", "--iters", "1", "--warmup", "0",
         "--no-baselines", "--timeout", "20")


@pytest.mark.parametrize("side,value", [("got", np.nan), ("got", np.inf), ("ref", np.nan),
                                        ("ref", -np.inf)])
def test_non_finite_logits_are_wrong(side, value):
    ref = np.zeros((2, 3, 5), dtype=np.float32)
    got = ref.copy()
    (got if side == "got" else ref)[1, 2, 4] = value
    check = check_logits("float32", got, ref)
    assert check.wrong == 1 and not check.ok


def test_all_nan_logits_never_pass():
    nan = np.full((4, 7), np.nan, dtype=np.float32)
    check = check_logits("bfloat16", nan, nan)
    assert check.wrong == nan.size and not check.ok


def test_nan_logits_end_to_end_fail_the_run(capsys):
    """The output rank's weights turn to NaN mid-run: the table says so and the exit code is 1."""
    rc = main([*QUICK, "--json", "--inject-fault", "0:s2.mb0.COMPUTE:nan"])
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert rc == 1
    assert out["check"]["ok"] is False and out["check"]["wrong"] == out["check"]["elements"] == 2 * 24 * 101
    assert captured.err.strip() == ("pyengine run: output check failed: 4848 of 4848 logits wrong "
                                    "or not finite")


def test_a_healthy_run_passes_the_check(capsys):
    assert main([*QUICK, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["check"]["ok"] is True


def test_a_failed_write_after_the_run_keeps_the_results(capsys, tmp_path, monkeypatch):
    import pyengine.report.trace as trace

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trace, "write_trace", full_disk)
    dump = tmp_path / "dump"
    rc = main([*QUICK, "--json", "--trace", str(tmp_path / "t.json"), "--dump", str(dump)])
    captured = capsys.readouterr()
    assert rc == 1
    assert json.loads(captured.out)["check"]["ok"] is True  # the measured results were printed
    assert captured.err.strip().splitlines() == [
        f"pyengine run: could not write --trace {tmp_path / 't.json'}: No space left on device",
        f"wrote dump {dump}"]  # says what it did write
    assert (dump / "logits.pt").exists()  # the other outputs were still written


@pytest.mark.slow
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU scaling")
def test_the_local_backend_on_cpu_scales_the_seed_like_gloo(capsys):
    assert main(["run", "--backend", "local", "--iters", "1", "--warmup", "0", "--no-baselines",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["backend"] == "local" and "hidden_size 4096→256" in out["scaled"]


def test_rank_0_draws_one_bar_over_every_forward_unless_json(capsys, monkeypatch):
    from helpers import RecordingBars
    from pyengine.execute import measure

    monkeypatch.setattr(measure, "progress", recording := RecordingBars())
    assert main([*QUICK]) == 0
    drawn = recording.drawn()
    assert len(recording.bars) == 3 and len(drawn) == 1  # one per rank, rank 0's drawn
    assert drawn[0].total == len(drawn[0].steps) == 1  # one variant (--no-baselines), no warm-up, one forward
    recording.bars.clear()
    assert main([*QUICK, "--json"]) == 0
    assert recording.bars and not recording.drawn()
