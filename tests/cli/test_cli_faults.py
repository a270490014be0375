"""Faults from outside, as a user meets them: a rank process killed (SIGKILL, as the OOM killer
does) or stopped (SIGSTOP) in turn, a virtual rank that dies or stalls, Ctrl-C and SIGTERM.
Each ends the job within the timeout with one line naming the true cause, leaving no process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import TINY_CONFIG, packaged_config

TIMEOUT_S = "3"  # per action: how long a peer waits on a stopped rank before the job ends
LONG = ("--iters", "100000", "--warmup", "0", "--no-baselines")  # runs until something stops it


def _start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pyengine", "run", "--config", TINY_CONFIG,
                             "--timeout", TIMEOUT_S, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rank_pids(parent: int) -> dict[int, int]:
    """rank -> pid of the parent's rank processes (they are named pyengine-rankN)."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and comm.startswith("pyengine-rank"):
            out[int(comm.removeprefix("pyengine-rank"))] = int(pid)
    return out


def _wait_for_ranks(p: subprocess.Popen, n: int = 3, limit_s: float = 120) -> dict[int, int]:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        pids = _rank_pids(p.pid)
        if len(pids) == n:
            return pids
        assert p.poll() is None, p.communicate()
        time.sleep(0.1)
    p.kill()
    pytest.fail("the ranks did not start")


def _finish(p: subprocess.Popen, pids: dict[int, int], limit_s: float = 60) -> tuple[int, str, float]:
    start = time.monotonic()
    _, err = p.communicate(timeout=limit_s)
    elapsed = time.monotonic() - start
    time.sleep(0.2)
    left = [pid for pid in pids.values() if os.path.exists(f"/proc/{pid}")
            and open(f"/proc/{pid}/stat").read().rpartition(")")[2].split()[0] != "Z"]
    assert not left, f"rank processes left behind: {left}"
    return p.returncode, err, elapsed


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1, 2])
@pytest.mark.parametrize("sig", ["SIGKILL", "SIGSTOP"])
def test_a_killed_or_stopped_rank_process_is_named(sig, rank):
    p = _start("--backend", "gloo", *LONG)
    pids = _wait_for_ranks(p)
    time.sleep(1.5)  # into the pipeline (or still in start-up under load: either way, named)
    os.kill(pids[rank], getattr(signal, sig))
    rc, err, elapsed = _finish(p, pids)
    how = "killed by signal SIGKILL" if sig == "SIGKILL" else "stopped (SIGSTOP or a debugger)"
    assert rc == 1 and err.startswith(f"pyengine run: rank {rank} failed in action "), err
    assert how in err and len(err.strip().splitlines()) == 1, err
    assert elapsed < 30, f"{elapsed:.0f} s to end the job"


@pytest.mark.slow
@pytest.mark.parametrize("mode,rank", [("exit", 0), ("hang", 2)])  # every rank in turn, in
def test_a_virtual_rank_that_dies_or_stalls_is_named(mode, rank):  # process: tests/execute/test_blame
    action = "s0.mb1.COMPUTE" if rank == 0 else "s1.mb1.COMPUTE"
    p = _start("--backend", "local", "--iters", "1", "--warmup", "0", "--no-baselines",
               "--inject-fault", f"{rank}:{action}:{mode}")
    rc, err, elapsed = _finish(p, {})
    assert rc == 1, err
    if mode == "exit":
        assert err.startswith(f"pyengine run: rank {rank} failed: RankError: rank {rank} failed in "
                              f"action {action}: RuntimeError: injected fault"), err
    else:
        assert err.startswith(f"pyengine run: rank {rank} failed in action {action}: stalled"), err
    assert "Traceback" not in err and "terminate called" not in err


@pytest.mark.slow
def test_ctrl_c_on_the_thread_backend_is_exit_130_and_one_line():
    p = _start("--backend", "local", *LONG)
    time.sleep(8)  # imports done, virtual ranks running
    assert p.poll() is None
    p.send_signal(signal.SIGINT)
    rc, err, elapsed = _finish(p, {}, limit_s=30)
    # "; every rank stopped" once the virtual ranks run (a slow start may be interrupted earlier)
    assert rc == 130 and err.startswith("pyengine run: interrupted") and err.count("\n") == 1, err
    assert elapsed < 10


@pytest.mark.slow
@pytest.mark.parametrize("sig,rc,word", [("SIGTERM", 143, "terminated (SIGTERM)"),
                                         ("SIGINT", 130, "interrupted")])
def test_a_signal_to_the_parent_stops_every_rank_process(sig, rc, word):
    p = _start("--backend", "gloo", *LONG)
    pids = _wait_for_ranks(p)
    time.sleep(1.0)
    if sig == "SIGINT":  # Ctrl-C in a terminal reaches the whole foreground group
        for pid in (p.pid, *pids.values()):
            os.kill(pid, signal.SIGINT)
    else:
        p.send_signal(signal.SIGTERM)
    code, err, elapsed = _finish(p, pids, limit_s=30)
    assert (code, err) == (rc, f"pyengine run: {word}; every rank stopped\n")  # no leaked semaphores
    assert elapsed < 10


_ENDLESS = {"run": ("run", "--config", TINY_CONFIG, *LONG),
            "generate": ("generate", "--config", packaged_config("seed_model_3gpu.json"),
                         "--max-new-tokens", "4", "--warmup", "100000")}


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "generate"])
@pytest.mark.parametrize("sig,rc", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_or_sighup_on_the_thread_backend_is_one_line_every_time(command, sig, rc):
    # exiting the interpreter around native threads aborted now and then (exit -6,
    # "terminate called without an active exception"): several tries, at different moments
    for delay in (0.5, 1.5, 2.5, 3.5, 4.5):
        p = subprocess.Popen([sys.executable, "-m", "pyengine", *_ENDLESS[command], "--backend", "local"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(delay)
        assert p.poll() is None, p.communicate()
        p.send_signal(getattr(signal, sig))
        code, err, _ = _finish(p, {}, limit_s=30)
        assert (code, err) == (rc, f"pyengine {command}: terminated ({sig}); every rank stopped\n"), delay


def test_a_signal_wrapped_by_a_c_extension_is_still_one_line(capsys, monkeypatch):
    """A SIGTERM raised while an extension module initializes comes back as another error (its
    context is the signal): still the one line and 143, never a traceback."""
    import pyengine.cli.main as cli

    def wrapped(argv):
        try:
            raise cli.Terminated(signal.SIGTERM)
        except cli.Terminated as e:
            raise SystemError("initialization of _C raised unreported exception") from e

    monkeypatch.setattr(cli, "_dispatch", wrapped)
    assert cli.main(["run"]) == 143
    assert capsys.readouterr().err == "pyengine run: terminated (SIGTERM); every rank stopped\n"
