"""Decode steps as schedule tables: 2 layers, 2 groups of sequences, 2 steps, written out by hand.

A decode step is a Batch of one token per live sequence in near-even groups; its tables depend on
the group count only (groups never share a sequence, so no chunk waits for another), so step 2 --
every position one further -- runs exactly step 1's tables, and the runtime keeps them."""

import pytest

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.model.batch import Batch
from pyengine.schedule import build

SPEC = load_spec(TINY_CONFIG).replace(model={"num_layers": 2, "num_attention_heads": 4,
                                             "num_key_value_heads": 2, "batch_size": 4, "seq_len": 6})
STEP1 = Batch.decode([6, 3, 5, 4], 2)  # 4 sequences of different lengths -> groups (0, 1), (2, 3)
STEP2 = Batch.decode([7, 4, 6, 5], 2)

# The ping-pong, by the builder's rules: the attention GPU computes group 1's layer-0 attention
# while the shards compute group 0's experts, then group 0's layer 1 as soon as its partials are
# back, while the shards take group 1's layer 0; the head runs per group after layer 1.
GPU0 = ["l0.s0.mb0.COMPUTE", "l0.s0.mb0.SEND.act->1", "l0.s0.mb0.SEND.act->2",
        "l0.s0.mb1.COMPUTE", "l0.s0.mb1.SEND.act->1", "l0.s0.mb1.SEND.act->2",
        "l0.s0.mb0.RECV.partial<-1", "l0.s0.mb0.RECV.partial<-2",
        "l1.s0.mb0.COMPUTE", "l1.s0.mb0.SEND.act->1", "l1.s0.mb0.SEND.act->2",
        "l0.s0.mb1.RECV.partial<-1", "l0.s0.mb1.RECV.partial<-2",
        "l1.s0.mb1.COMPUTE", "l1.s0.mb1.SEND.act->1", "l1.s0.mb1.SEND.act->2",
        "l1.s2.mb0.RECV.partial<-1", "l1.s2.mb0.RECV.partial<-2", "l1.s2.mb0.COMPUTE",
        "l1.s2.mb1.RECV.partial<-1", "l1.s2.mb1.RECV.partial<-2", "l1.s2.mb1.COMPUTE"]
SHARD = ["l0.s1.mb0.RECV.act<-0", "l0.s1.mb1.RECV.act<-0",
         "l0.s1.mb0.COMPUTE", "l0.s1.mb0.SEND.partial->0", "l1.s1.mb0.RECV.act<-0",
         "l0.s1.mb1.COMPUTE", "l0.s1.mb1.SEND.partial->0", "l1.s1.mb1.RECV.act<-0",
         "l1.s1.mb0.COMPUTE", "l1.s1.mb0.SEND.partial->0",
         "l1.s1.mb1.COMPUTE", "l1.s1.mb1.SEND.partial->0"]


@pytest.mark.parametrize("step", [STEP1, STEP2], ids=["step1", "step2"])
def test_two_layers_two_groups_by_hand(step):
    assert [c.sequences for c in step.chunks] == [(0, 1), (2, 3)] and step.kv_order() == []
    table = build(SPEC, "gpipe", batch=step)
    assert {r: [a.id for a in acts] for r, acts in table.items()} == {0: GPU0, 1: SHARD, 2: SHARD}
    assert all(a.after == () for acts in table.values() for a in acts)


def test_the_steps_share_their_tables():
    assert build(SPEC, "gpipe", batch=STEP1) == build(SPEC, "gpipe", batch=STEP2)
    assert build(SPEC, "asready", batch=STEP1) == build(SPEC, "asready", batch=STEP2)


def test_fewer_live_sequences_than_groups():
    one = Batch.decode([9], 2)  # one live sequence: one group
    table = build(SPEC, "gpipe", batch=one)
    assert {a.micro_batch for acts in table.values() for a in acts} == {0}
