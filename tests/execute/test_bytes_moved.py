"""The bytes the runtime hands to the transport are the bytes the planner predicts.

Each virtual rank (local transport, CPU threads) runs through a transport wrapper that records
every call: its action name and the bytes of the buffers it passes. Those must equal
roofline.message_bytes of the action (the planner's traffic and the simulator's comm times
come from it; tests/predict/test_consistency.py checks it against hand counts), and for the
odd case below they are also written out by hand: a reduce-scatter pads its input to equal
chunks and sends only each member's chunk.
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from pyengine.core.spec import DeploymentSpec
from pyengine.execute.engine import Engine
from pyengine.model.weights import make_tokens
from pyengine.predict.roofline import message_bytes
from pyengine.schedule import Kind, build
from pyengine.transport.local import LocalTransport
from helpers import on_threads, small_spec

BASE = dict(model={"batch_size": 1, "seq_len": 25}, schedule={"micro_batches": 2})  # T = 25 (odd)
THREE_WAY = {"stages": [  # 3-way TP over every GPU, output inside the group on GPU 1
    {"name": "embed", "gpus": [0]},
    {"name": "experts", "gpus": [0, 1, 2], "tensor_parallel_size": 3, "shard_fractions": [0.2, 0.3, 0.5]},
    {"name": "output", "gpus": [1]}]}


def _cases():
    base = small_spec(**BASE)
    for b in ("all_reduce", "reduce_scatter", "partials"):
        # group (1, 2), output 0 outside it; micro-batches of 13 and 12 tokens
        yield pytest.param(base.replace(comm={"boundary": b}), id=f"pair-{b}")
        # group (0, 1, 2), output 1 inside it; micro-batches of 9, 8, 8 tokens
        yield pytest.param(base.replace(comm={"boundary": b}, parallel=THREE_WAY,
                                        schedule={"micro_batches": 3}), id=f"three-way-{b}")


class Recording:
    """A transport that logs (action name, op, bytes passed) and forwards every call."""

    def __init__(self, inner):
        self.inner = inner
        self.log: list[tuple[str, str, int]] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def send(self, t, peer, *, name=""):
        self.log.append((name, "send", t.nbytes))
        return self.inner.send(t, peer, name=name)

    def recv(self, t, peer, *, name=""):
        self.log.append((name, "recv", t.nbytes))
        return self.inner.recv(t, peer, name=name)

    def all_reduce(self, t, group, *, name=""):
        self.log.append((name, "all_reduce", t.nbytes))
        return self.inner.all_reduce(t, group, name=name)

    def reduce_scatter(self, out, t, group, *, name=""):
        self.log.append((name, "reduce_scatter.in", t.nbytes))
        self.log.append((name, "reduce_scatter.out", out.nbytes))
        return self.inner.reduce_scatter(out, t, group, name=name)


def _run(spec: DeploymentSpec) -> list[Recording]:
    recs = [Recording(t) for t in LocalTransport.create(3, "cpu", 20)]
    on_threads(lambda r: Engine(spec, recs[r], seed=5).forward(make_tokens(spec, seed=5)))
    return recs


@pytest.mark.parametrize("spec", list(_cases()))
def test_bytes_handed_to_the_transport_are_the_predicted_bytes(spec):
    recs = _run(spec)
    table = build(spec)
    for r, rec in enumerate(recs):
        moved = defaultdict(int)
        for name, op, nbytes in rec.log:
            moved[(name, op)] += nbytes
        want = {}
        for a in table[r]:
            if a.kind is Kind.SEND:
                want[(a.id, "send")] = message_bytes(spec, a)
            elif a.kind is Kind.RECV:
                want[(a.id, "recv")] = message_bytes(spec, a)
            elif a.kind is Kind.REDUCE and a.payload.value == "sum":
                want[(a.id, "all_reduce")] = message_bytes(spec, a)
            elif a.kind is Kind.REDUCE:
                want[(a.id, "reduce_scatter.in")] = message_bytes(spec, a)
                want[(a.id, "reduce_scatter.out")] = a.payload.nbytes(spec, spec.micro_batch_sizes()[a.micro_batch])
        assert dict(moved) == want, f"rank {r}"


def test_odd_reduce_scatter_bytes_by_hand():
    """Three-way reduce-scatter of micro-batches of 9, 8, 8 tokens (H=24, fp32 = 96 bytes a row):
    chunks of ceil(9/3) = ceil(8/3) = 3 rows; every member's input padded to 9 rows."""
    spec = small_spec(**BASE).replace(comm={"boundary": "reduce_scatter"}, parallel=THREE_WAY,
                                                  schedule={"micro_batches": 3})
    recs = _run(spec)
    row = 24 * 4
    act_row = 24 * 4 + 2 * 4 + 2 * 4  # u + int32 ids + fp32 weights
    sent0 = defaultdict(int)  # ACT goes as three tensors under one name: summed
    for n, op, b in recs[0].log:
        sent0[(n, op)] += b
    assert sent0[("s0.mb0.SEND.act->1", "send")] == 9 * act_row
    assert sent0[("s0.mb2.SEND.act->2", "send")] == 8 * act_row
    assert sent0[("s0.mb1.SEND.resid->1", "send")] == 8 * row
    for r in range(3):
        got = {(n, op): b for n, op, b in recs[r].log if op.startswith("reduce_scatter")}
        assert got == {(f"s1.mb{mb}.REDUCE.half@0,1,2", op): b for mb in range(3)
                       for op, b in (("reduce_scatter.in", 9 * row), ("reduce_scatter.out", 3 * row))}
    sent_half = {(n, b) for n, op, b in recs[2].log if ".SEND.half" in n}
    assert sent_half == {(f"s1.mb{mb}.SEND.half->1", 3 * row) for mb in range(3)}
