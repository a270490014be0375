"""Liveness board and blame: a dead, silent or stalled rank is named with its action; peers
waiting on it never are. The thread backend is exercised here in-process (virtual ranks that
die or stall in turn); process kills and stops are in tests/cli/test_cli_faults.py."""

from __future__ import annotations

import multiprocessing
import threading
import time

import pytest
import torch

from pyengine.execute.blame import SILENT_S, explain, find_cause, idle_for
from pyengine.execute.launch import Backend, LaunchError, run_ranks
from pyengine.execute.liveness import DONE, FAILED, RUNNING, WAITED, Beacon, Board, Record, waited_on_peer
from pyengine.execute.runtime import RankError
from pyengine.transport.base import TransportError


def _rec(rank, state=RUNNING, waiting=False, since=100.0, beat=0.0, action="a", wait_on=""):
    return Record(rank, state, waiting, 1, since, beat, action, wait_on if waiting else "")


def test_board_round_trip_and_waits():
    board = Board.for_threads(2)
    beacon = Beacon(board, 1, heartbeat=False)
    with beacon:
        beacon.on_action("s1.mb0.COMPUTE", False)
        beacon.on_action("s1.mb0.RECV.act<-0", True)
        rec = board.read(1)
        assert (rec.state, rec.action, rec.waiting, rec.wait_on) == (
            RUNNING, "s1.mb0.COMPUTE", True, "s1.mb0.RECV.act<-0")
        beacon.on_action("s1.mb0.COMPUTE", False)  # the runtime ends a wait this way
        assert not board.read(1).waiting
        with beacon.waiting("barrier"):
            assert board.read(1).wait_on == "barrier"
        assert board.read(1).action == "s1.mb0.COMPUTE" and not board.read(1).waiting
    assert board.read(1).state == DONE and board.read(0).state == 0


def test_a_rank_that_raised_on_a_wait_is_marked_a_bystander():
    board = Board.for_threads(2)
    with pytest.raises(RuntimeError):
        with Beacon(board, 0, heartbeat=False):
            try:
                raise TransportError("gloo recv (rank 0, peer 1) timed out")
            except TransportError as e:
                raise RuntimeError("rank 0 failed in action x") from e
    with pytest.raises(ValueError):
        with Beacon(board, 1, heartbeat=False):
            raise ValueError("a real bug")
    assert board.read(0).state == WAITED and board.read(1).state == FAILED
    assert waited_on_peer(threading.BrokenBarrierError()) and not waited_on_peer(KeyError("x"))


def test_a_connection_closed_by_a_dead_peer_is_a_wait_not_an_own_failure():
    # gloo raises a plain RuntimeError when the other end died, even while an op is posted;
    # the runtime wraps it in a RankError: the survivor must still count as waiting on a peer
    gloo = RuntimeError("[gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4242")
    try:
        try:
            raise gloo
        except RuntimeError as e:
            raise RankError(0, "s2.mb2.RECV.partial<-1", f"RuntimeError: {e}") from e
    except RankError as wrapped:
        assert waited_on_peer(wrapped)
    assert waited_on_peer(RuntimeError("Connection reset by peer"))
    assert not waited_on_peer(RuntimeError("CUDA error: an illegal memory access"))
    board = Board.for_threads(1)
    with pytest.raises(RuntimeError), Beacon(board, 0, heartbeat=False):
        raise gloo
    assert board.read(0).state == WAITED


def _beat_in_child(board):
    with Beacon(board, 1, heartbeat=True) as b:
        b.on_action("s1.mb3.COMPUTE", False)
        time.sleep(0.6)


@pytest.mark.slow
def test_the_board_crosses_into_a_spawned_process():
    ctx = multiprocessing.get_context("spawn")
    board = Board.for_processes(2, ctx)
    p = ctx.Process(target=_beat_in_child, args=(board,))
    p.start()
    p.join(60)
    rec = board.read(1)
    assert p.exitcode == 0 and rec.state == DONE and rec.action == "s1.mb3.COMPUTE"
    assert rec.beat > 0  # the heartbeat thread ran


def test_order_dead_then_silent_then_stalled_never_waiting():
    now = 1000.0
    waiting = _rec(0, waiting=True, since=now - 50, wait_on="s2.mb1.RECV.partial<-1")
    stalled = _rec(1, since=now - 9, action="s1.mb1.COMPUTE", beat=now - 0.1)
    silent = _rec(2, since=now - 1, action="s1.mb2.COMPUTE", beat=now - SILENT_S - 1)
    assert find_cause([waiting, stalled], dead={}, now=now).rank == 1
    v = find_cause([waiting, stalled, silent], dead={}, now=now)
    assert (v.rank, v.action) == (2, "s1.mb2.COMPUTE") and "silent" in v.reason
    v = find_cause([waiting, stalled, silent], dead={0: "killed by signal SIGKILL"}, now=now)
    assert v.rank == 0 and v.reason == "killed by signal SIGKILL"
    assert "waiting on s2.mb1.RECV.partial<-1" in v.action
    assert find_cause([waiting, _rec(1, state=WAITED)], dead={}, now=now) is None
    frozen = find_cause([waiting, _rec(1, waiting=True, beat=now)], dead={}, frozen={1}, now=now)
    assert frozen.rank == 1 and "stopped" in frozen.reason


def test_explain_keeps_a_real_error_and_redirects_a_symptom():
    board = Board.for_threads(3)
    board.write(0, WAITED, True, 5, 1.0, "s2.mb1.COMPUTE", "s2.mb1.RECV.partial<-1")
    board.write(1, RUNNING, False, 3, 1.0, "s1.mb1.COMPUTE", "")
    board.write(2, FAILED, False, 4, 1.0, "s1.mb2.COMPUTE", "")
    rank, text = explain(board, 0, "raised TransportError: timed out", dead={}, final=True)
    assert rank == 1 and text.startswith("rank 1 failed in action s1.mb1.COMPUTE: stalled")
    assert text.endswith("rank 0 noticed while waiting on s2.mb1.RECV.partial<-1")
    rank, text = explain(board, 2, "raised ValueError: shapes", dead={}, final=True)
    assert (rank, text) == (2, "rank 2 failed: raised ValueError: shapes")
    assert explain(Board.for_threads(1), None, "x", dead={}, final=False) is None
    assert idle_for(board.records(), now=11.0) == 10.0


# ---- the thread backend, in this process ------------------------------------------------------

def _ring_body(bad_rank: int, mode: str):
    """Every rank passes a tensor round a ring 20 times; `bad_rank` dies or stalls at step 5."""
    def body(ctx):
        t = torch.zeros(4)
        for step in range(20):
            ctx.on_action(f"step{step}", False)
            if ctx.rank == bad_rank and step == 5:
                if mode == "die":
                    raise RuntimeError("planted failure")
                time.sleep(2.5)  # a stall longer than the peers' 1 s timeout, but bounded
            nxt, prv = (ctx.rank + 1) % ctx.world_size, (ctx.rank - 1) % ctx.world_size
            sends = ctx.transport.send(t, nxt, name=f"ring{step}")
            ctx.on_action(f"step{step}.recv", True)
            ctx.transport.recv(t, prv, name=f"ring{step}").wait()
            sends.wait()
            ctx.on_action(f"step{step}", False)
        return ctx.rank
    return body


@pytest.mark.parametrize("rank", [0, 1, 2])
@pytest.mark.parametrize("mode", ["die", "stall"])
def test_thread_backend_names_the_rank_that_died_or_stalled(rank, mode):
    start = time.monotonic()
    with pytest.raises(LaunchError) as e:
        run_ranks(_ring_body(rank, mode), 3, backend=Backend.LOCAL, groups=[(0, 1, 2)], timeout_s=1.0,
                  job_timeout_s=60)
    text = str(e.value)
    if mode == "die":
        assert text.startswith(f"rank {rank} failed: RuntimeError: planted failure"), text
    else:
        assert text.startswith(f"rank {rank} failed in action step5: stalled"), text
    assert time.monotonic() - start < 15


def test_thread_backend_results_and_idle_limit():
    assert run_ranks(_ring_body(-1, "die"), 3, backend=Backend.LOCAL, groups=[(0, 1, 2)],
                     timeout_s=5, job_timeout_s=60) == [0, 1, 2]

    def all_stuck(ctx):  # nobody waits on anybody: only the idle limit can end it
        ctx.on_action("busy", False)
        time.sleep(2.0)

    start = time.monotonic()
    with pytest.raises(LaunchError, match=r"failed in action busy: stalled"):
        run_ranks(all_stuck, 2, backend=Backend.LOCAL, groups=[(0, 1)], timeout_s=5, job_timeout_s=0.5)
    assert time.monotonic() - start < 10
