"""commbench: flag parsing, nccl-tests arithmetic, #wrong counting (incl. a planted
corruption), local backend on CPU threads, one real gloo run."""

import argparse
import json
import multiprocessing
import subprocess
import sys

import pytest

from pyengine.commbench import cli as commbench
from pyengine.commbench.harness import RankRow, combine, sizes
from pyengine.core.collectives import Collective
from pyengine.core.errors import UsageError


def parse(*argv):
    parser = argparse.ArgumentParser()
    commbench.add_arguments(parser)
    return parser.parse_args(list(argv))


def run_json(capsys, *argv):
    rc = commbench.run(parse(*argv, "--json"))
    return rc, json.loads(capsys.readouterr().out)


def test_parse_size():
    assert commbench.parse_size("1K") == 1024
    assert commbench.parse_size("4M") == 4 << 20
    assert commbench.parse_size("1G") == 1 << 30
    assert commbench.parse_size("123") == 123
    with pytest.raises(argparse.ArgumentTypeError):
        commbench.parse_size("4X")


def test_flags_and_sizes():
    args = parse("-b", "1K", "-e", "64K", "-f", "4", "-n", "3", "-w", "1", "-c", "0", "-d", "half",
                 "--op", "broadcast", "--backend", "local", "--nranks", "2", "--timeout", "5")
    assert (args.minbytes, args.maxbytes, args.stepfactor, args.iters, args.warmup_iters) == (
        1024, 65536, 4, 3, 1)
    assert sizes(1024, 65536, 4) == (1024, 4096, 16384, 65536)
    parser = argparse.ArgumentParser()
    commbench.add_arguments(parser)
    assert "--corrupt-rank" not in parser.format_help()  # a testing hook, hidden from --help
    assert parser.parse_args(["--corrupt-rank", "2"]).corrupt_rank == 2


def test_bus_factors():
    assert Collective.ALL_REDUCE.bus_factor(3) == pytest.approx(4 / 3)
    assert Collective.REDUCE_SCATTER.bus_factor(3) == pytest.approx(2 / 3)
    assert Collective.BROADCAST.bus_factor(3) == 1.0
    assert Collective.SENDRECV.bus_factor(3) == 1.0


def test_combine_takes_max_time_and_sums_wrong():
    per_rank = [[RankRow(1000, 250, 10.0, 0)], [RankRow(1000, 250, 20.0, 2)]]
    (row,) = combine(per_rank, "all_reduce", 2)
    assert row["time_us"] == 20.0 and row["wrong"] == 2
    assert row["algbw_GBps"] == pytest.approx(1000 / 20e-6 / 1e9)
    assert row["busbw_GBps"] == pytest.approx(row["algbw_GBps"] * 1.0)


@pytest.mark.parametrize("op", ["all_reduce", "reduce_scatter", "broadcast", "sendrecv"])
@pytest.mark.parametrize("dtype", ["float", "half", "bfloat16", "int32"])
def test_local_backend_every_op_is_exact(capsys, op, dtype):
    rc, out = run_json(capsys, "--backend", "local", "--nranks", "3", "--op", op, "-d", dtype,
                       "-b", "12", "-e", "12K", "-f", "32", "-n", "2", "-w", "1", "-r", "2",
                       "--timeout", "10")
    assert rc == 0
    assert [r["wrong"] for r in out["rows"]] == [0, 0, 0]
    assert out["meta"]["nranks"] == 3 and out["meta"]["backend"] == "local"


def test_planted_corruption_is_counted(capsys):
    rc, out = run_json(capsys, "--backend", "local", "--nranks", "3", "--op", "all_reduce",
                       "-b", "1K", "-e", "4K", "-f", "4", "-n", "1", "-w", "0", "--corrupt-rank", "1",
                       "--timeout", "10")
    assert rc == 1
    assert [r["wrong"] for r in out["rows"]] == [1, 1]


def test_check_off_prints_na(capsys):
    rc = commbench.run(parse("--backend", "local", "--nranks", "2", "-b", "1K", "-e", "1K",
                             "-n", "1", "-w", "0", "-c", "0"))
    text = capsys.readouterr().out
    assert rc == 0
    assert text.splitlines()[-3].split()[-1] == "N/A"


@pytest.mark.slow
def test_gloo_cli_prints_the_table():
    proc = subprocess.run(
        [sys.executable, "-m", "pyengine.commbench", "--backend", "gloo", "--nranks", "3",
         "--op", "all_reduce", "-b", "1K", "-e", "64K", "-f", "4", "-n", "3", "-w", "1", "-c", "1",
         "--timeout", "20"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("# pyengine bench comm: op all_reduce, backend gloo, nranks 3")
    assert any("python -m pyengine.commbench --backend gloo" in line for line in lines)
    header = next(line for line in lines if "algbw" in line).split()
    assert header[1:] == ["size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong"]
    rows = [line.split() for line in lines if not line.startswith("#")]
    assert [int(r[0]) for r in rows] == [1024, 4096, 16384, 65536]
    assert all(r[2] == "float" and r[3] == "sum" and r[-1] == "0" for r in rows)
    time_us, algbw, busbw = (float(x) for x in rows[-1][5:8])
    assert time_us > 0 and busbw == pytest.approx(algbw * 4 / 3, rel=0.01, abs=0.002)
    assert multiprocessing.active_children() == []


@pytest.mark.slow
def test_gloo_corruption_through_spawned_ranks(capsys):
    rc, out = run_json(capsys, "--backend", "gloo", "--nranks", "2", "--op", "reduce_scatter",
                       "-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "--corrupt-rank", "0",
                       "--timeout", "20")
    assert rc == 1 and out["rows"][0]["wrong"] == 1


@pytest.mark.parametrize("flags,flag", [
    (("-b", "0"), "-b"), (("-b", "4K", "-e", "1K"), "-e"), (("-n", "0"), "-n"),
    (("--nranks", "0"), "--nranks"), (("--timeout", "0"), "--timeout"), (("-w", "-1"), "-w"),
    (("-r", "3", "--nranks", "3"), "-r"),
    (("--timeout", "nan"), "--timeout"), (("--timeout", "inf"), "--timeout"),
    (("--timeout", "1e-9"), "--timeout"), (("--timeout", "1e12"), "--timeout"),
    (("-n", str(10**12)), "-n"), (("-w", str(10**9)), "-w"), (("--nranks", "100000"), "--nranks"),
    (("-f", "0"), "-f"), (("-b", "1", "-e", "1G", "-f", "1"), "-f"),  # a billion rows
    (("-b", "1K", "-e", "60000G"), "-e"),  # buffers no host can allocate
])
def test_bad_flags_are_refused_before_anything_runs(flags, flag, monkeypatch):
    import pyengine.execute.launch as launch

    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("ranks were started"))
    with pytest.raises(UsageError) as e:
        commbench.run(parse("--backend", "local", *flags))
    assert e.value.field == flag and len(str(e.value)) < 200


@pytest.mark.slow  # a subprocess
def test_a_timeout_too_short_to_start_is_refused_naming_it():
    """1 ms once started the ranks and died in a collective blaming one; it is the timeout."""
    proc = subprocess.run([sys.executable, "-m", "pyengine", "bench", "comm", "--backend", "gloo",
                           "--nranks", "3", "--timeout", "0.001", "-b", "1K", "-e", "64K"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == ("pyengine bench comm: bad option: --timeout = 0.001: must be in [1, 86400] "
                                   "seconds per action (below 1 s the ranks cannot even connect at start-up)")


@pytest.mark.slow  # a subprocess
def test_bad_flag_through_the_cli_exits_2_with_one_line():
    proc = subprocess.run([sys.executable, "-m", "pyengine", "bench", "comm", "-b", "4K", "-e", "1K"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "pyengine bench comm: bad option: -e = 1024: must be >= -b (4096)"


@pytest.mark.parametrize("flags,flag,words", [
    (("--backend", "local", "--op", "reduce_scatter", "-b", "7", "-e", "7"), "-e",
     "no size from -b 7 holds one element per rank for reduce_scatter (3 ranks x 4 B per element"),
    (("--backend", "local", "--op", "sendrecv", "--nranks", "1"), "--nranks", "sendrecv needs at least 2"),
    (("--backend", "gloo", "--nranks", "64", "-b", "1K", "-e", "1K"), "--nranks",
     "64 rank processes need"),  # the processes are the limit, not -e's 1 KB
])
def test_sweeps_that_cannot_run_are_refused_naming_the_real_limit(flags, flag, words, monkeypatch):
    import pyengine.execute.launch as launch
    import pyengine.execute.memory as memory

    monkeypatch.setattr(memory, "host_available_bytes", lambda: 10 * 2**30)
    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("ranks were started"))
    with pytest.raises(UsageError) as e:
        commbench.run(parse(*flags))
    assert e.value.field == flag and words in str(e.value), str(e.value)


def test_rank_0_draws_one_bar_over_the_sizes_unless_json(capsys, monkeypatch):
    """bench comm shows progress on a terminal: rank 0 advances once per size; --json draws none."""
    from helpers import RecordingBars
    from pyengine.commbench import harness

    monkeypatch.setattr(harness, "progress", recording := RecordingBars())
    assert commbench.run(parse("-b", "1K", "-e", "4K", "-f", "2", "-n", "1", "-w", "0",
                               "--backend", "local", "--nranks", "2")) == 0
    drawn = recording.drawn()
    assert len(drawn) == 1 and drawn[0].total == 3 and len(drawn[0].steps) == 3 and "all_reduce" in drawn[0].what
    recording.bars.clear()
    capsys.readouterr()  # the table
    run_json(capsys, "-b", "1K", "-e", "4K", "-f", "2", "-n", "1", "-w", "0", "--backend", "local",
             "--nranks", "2")
    assert recording.bars and not recording.drawn()
