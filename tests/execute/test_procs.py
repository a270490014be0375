"""spawn_ranks: results in rank order; a rank that raises, exits, is killed or stalls ends the
job fast with RankFailure naming it, and no child outlives the call."""

import multiprocessing
import os
import signal
import time

import pytest

from pyengine.execute.procs import RankFailure, spawn_ranks

pytestmark = pytest.mark.slow  # every test here spawns processes


def _ok(rank, nranks, port, scale):
    return {"rank": rank, "nranks": nranks, "port": port, "value": rank * scale,
            "env": (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"],
                    os.environ.get("PYENGINE_TEST_FLAG"))}


def _raises_on_1(rank, nranks, port):
    if rank == 1:
        raise ValueError("boom from the test")
    time.sleep(60)


def _exits_on_2(rank, nranks, port):
    if rank == 2:
        os._exit(7)
    time.sleep(60)


def _killed_on_0(rank, nranks, port):
    if rank == 0:
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)


def _peer_reports_then_killed_rank_shows(rank, nranks, port, flag):
    """Rank 0's report reaches the parent a moment before rank 1's death does (as when a
    killed process's sockets close before it can be reaped): rank 1 must still be named."""
    if rank == 0:
        while not os.path.exists(flag + ".ready"):  # rank 1 is up
            time.sleep(0.01)
        open(flag, "w").close()
        raise ConnectionError("connection closed by peer 1")
    open(flag + ".ready", "w").close()
    while not os.path.exists(flag):
        time.sleep(0.005)
    os.kill(os.getpid(), signal.SIGKILL)


def _stalls_on_1(rank, nranks, port):
    if rank == 1:
        time.sleep(60)
    return rank


def _returns_unpicklable(rank, nranks, port):
    return lambda: None


def _assert_no_children():
    assert multiprocessing.active_children() == []


def test_results_in_rank_order_with_env():
    results = spawn_ranks(_ok, 3, args=(10,), timeout_s=30, env={"PYENGINE_TEST_FLAG": "yes"})
    assert [r["value"] for r in results] == [0, 10, 20]
    assert len({r["port"] for r in results}) == 1
    assert [r["env"] for r in results] == [
        (str(r), "3", str(results[0]["port"]), "yes") for r in range(3)]
    _assert_no_children()


@pytest.mark.parametrize("fn, rank, text", [
    (_raises_on_1, 1, "raised ValueError: boom from the test"),
    (_exits_on_2, 2, "exited with code 7"),
    (_killed_on_0, 0, "killed by signal SIGKILL"),
], ids=["raises", "os_exit", "sigkill"])
def test_failure_is_named_fast_and_leaves_no_children(fn, rank, text):
    start = time.monotonic()
    with pytest.raises(RankFailure) as info:
        spawn_ranks(fn, 3, timeout_s=60)
    assert info.value.rank == rank
    assert f"rank {rank} failed" in str(info.value) and text in str(info.value)
    assert time.monotonic() - start < 15  # not the 60 s the other ranks would sleep
    _assert_no_children()


def test_a_killed_rank_is_named_not_the_peer_that_noticed(tmp_path):
    """Killed from outside (SIGKILL, the OOM killer) is not 'stopped by the launcher'."""
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_peer_reports_then_killed_rank_shows, 2, args=(str(tmp_path / "flag"),),
                    timeout_s=60)
    assert info.value.rank == 1, str(info.value)
    assert str(info.value).startswith("rank 1 failed: killed by signal SIGKILL; then rank 0 raised "
                                      "ConnectionError")
    _assert_no_children()


def test_env_is_in_place_when_the_child_starts():
    """Settings read once at library load (TORCH_CPP_LOG_LEVEL) need the env at exec time."""
    (result,) = spawn_ranks(_env_at_exec, 1, timeout_s=60, env={"PYENGINE_TEST_FLAG": "early"})
    assert result == "PYENGINE_TEST_FLAG=early" and "PYENGINE_TEST_FLAG" not in os.environ


def _env_at_exec(rank, nranks, port):
    with open("/proc/self/environ", "rb") as f:  # the block the interpreter started with
        entries = f.read().decode().split("\0")
    return next((e for e in entries if e.startswith("PYENGINE_TEST_FLAG=")), None)


def test_traceback_tail_is_included():
    with pytest.raises(RankFailure) as info:
        spawn_ranks(_raises_on_1, 2, timeout_s=60)
    assert "Traceback" in info.value.reason and "_raises_on_1" in info.value.reason


def test_timeout_names_the_stalled_rank():
    start = time.monotonic()
    with pytest.raises(RankFailure, match=r"rank 1 failed: timed out after 4 s; ranks still running: \[1\]"):
        spawn_ranks(_stalls_on_1, 2, timeout_s=4)
    assert time.monotonic() - start < 12
    _assert_no_children()


def test_unpicklable_result_is_reported():
    with pytest.raises(RankFailure, match="rank 0 failed: raised"):
        spawn_ranks(_returns_unpicklable, 1, timeout_s=30)
    _assert_no_children()


def test_bad_arguments():
    with pytest.raises(ValueError):
        spawn_ranks(_ok, 0, timeout_s=1)
    with pytest.raises(ValueError):
        spawn_ranks(_ok, 1, timeout_s=0)
