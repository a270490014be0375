"""Schedule tables of a model of layers: ids carry the layer, a layer's experts hand off to the
next layer's attention (the last one to the output head), and within one sequence and one layer
the chunks' attention runs in order (the KV cache) -- pinned by hand, and by the checker."""

import dataclasses

import pytest

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.model.batch import Batch
from pyengine.schedule import Kind, ScheduleError, build, check
from pyengine.schedule.build import kv_constraints

# The tiny config's layout (TP 0.4/0.6 over GPUs 1-2, partials straight to GPU 0, output on GPU 0)
# with 2 layers over one sequence of 9 tokens, m=3: chunks of 3, all of the same sequence.
TWO_LAYERS = load_spec(TINY_CONFIG).replace(model={"num_layers": 2, "num_attention_heads": 4,
                                                   "num_key_value_heads": 2, "batch_size": 1,
                                                   "seq_len": 9})

# GPipe, by the builder's rules: GPU 0 runs its list layer-major -- layer 0's attention for mb0,
# mb1, mb2, then layer 1's, then the output head for each -- each compute followed by its sends
# (u + routing to both shards), and each receive placed when the shard that sends it has computed
# (the shards' work is far larger than the attention's, so they arrive after GPU 0 moved on).
# Layer l's partials are received for stage 0 (consumed by layer l+1's attention) and carry l;
# the last layer's are received for stage 2 (the output head). GPUs 1 and 2 receive two chunks
# ahead of their compute, send each partial as soon as it is computed, and move to layer 1 as
# soon as GPU 0 has sent it.
GPU0 = ["l0.s0.mb0.COMPUTE", "l0.s0.mb0.SEND.act->1", "l0.s0.mb0.SEND.act->2",
        "l0.s0.mb1.COMPUTE", "l0.s0.mb1.SEND.act->1", "l0.s0.mb1.SEND.act->2",
        "l0.s0.mb0.RECV.partial<-1", "l0.s0.mb0.RECV.partial<-2",
        "l0.s0.mb2.COMPUTE", "l0.s0.mb2.SEND.act->1", "l0.s0.mb2.SEND.act->2",
        "l0.s0.mb1.RECV.partial<-1", "l0.s0.mb1.RECV.partial<-2",
        "l1.s0.mb0.COMPUTE", "l1.s0.mb0.SEND.act->1", "l1.s0.mb0.SEND.act->2",
        "l0.s0.mb2.RECV.partial<-1", "l0.s0.mb2.RECV.partial<-2",
        "l1.s0.mb1.COMPUTE", "l1.s0.mb1.SEND.act->1", "l1.s0.mb1.SEND.act->2",
        "l1.s2.mb0.RECV.partial<-1", "l1.s2.mb0.RECV.partial<-2",
        "l1.s0.mb2.COMPUTE", "l1.s0.mb2.SEND.act->1", "l1.s0.mb2.SEND.act->2",
        "l1.s2.mb1.RECV.partial<-1", "l1.s2.mb1.RECV.partial<-2",
        "l1.s2.mb0.COMPUTE",
        "l1.s2.mb2.RECV.partial<-1", "l1.s2.mb2.RECV.partial<-2",
        "l1.s2.mb1.COMPUTE", "l1.s2.mb2.COMPUTE"]
SHARD = ["l0.s1.mb0.RECV.act<-0", "l0.s1.mb1.RECV.act<-0",
         "l0.s1.mb0.COMPUTE", "l0.s1.mb0.SEND.partial->0", "l0.s1.mb2.RECV.act<-0",
         "l0.s1.mb1.COMPUTE", "l0.s1.mb1.SEND.partial->0", "l1.s1.mb0.RECV.act<-0",
         "l0.s1.mb2.COMPUTE", "l0.s1.mb2.SEND.partial->0", "l1.s1.mb1.RECV.act<-0",
         "l1.s1.mb0.COMPUTE", "l1.s1.mb0.SEND.partial->0", "l1.s1.mb2.RECV.act<-0",
         "l1.s1.mb1.COMPUTE", "l1.s1.mb1.SEND.partial->0",
         "l1.s1.mb2.COMPUTE", "l1.s1.mb2.SEND.partial->0"]


def test_two_layers_three_chunks_gpipe_by_hand():
    table = build(TWO_LAYERS, "gpipe")
    assert {r: [a.id for a in acts] for r, acts in table.items()} == {0: GPU0, 1: SHARD, 2: SHARD}


def test_deps_of_a_layer_and_the_kv_order():
    by_id = {a.id: a for a in build(TWO_LAYERS, "gpipe")[0]}
    # layer 1's attention of mb1 consumes layer 0's residual and both partials of mb1 ...
    assert [str(d) for d in by_id["l1.s0.mb1.COMPUTE"].deps] == [
        "l0.s0.mb1.COMPUTE", "l0.s0.mb1.RECV.partial<-1", "l0.s0.mb1.RECV.partial<-2"]
    # ... and follows layer 1's mb0, whose keys it reads, without consuming its results
    assert [str(d) for d in by_id["l1.s0.mb1.COMPUTE"].after] == ["l1.s0.mb0.COMPUTE"]
    assert by_id["l0.s0.mb0.COMPUTE"].after == () and by_id["l1.s2.mb2.COMPUTE"].after == ()


def test_chunks_of_different_sequences_are_not_ordered():
    # 3 sequences of 3 tokens: each chunk is its own sequence, so no chunk waits for another
    spec = TWO_LAYERS.replace(model={"batch_size": 3, "seq_len": 3})
    assert Batch.of_spec(spec).kv_order() == [] and kv_constraints(spec) == []
    assert all(a.after == () for acts in build(spec, "asready").values() for a in acts)


def test_checker_rejects_a_chunk_before_its_predecessor():
    """Strip the order deps and run chunk 1's attention before chunk 0's: every message still
    matches and every data dep is earlier, so only the KV-cache rule can reject it."""
    table = {r: [dataclasses.replace(a, after=()) for a in acts] for r, acts in build(TWO_LAYERS).items()}
    gpu0 = table[0]
    i0 = next(i for i, a in enumerate(gpu0) if a.id == "l0.s0.mb0.COMPUTE")
    i1 = next(i for i, a in enumerate(gpu0) if a.id == "l0.s0.mb1.COMPUTE")
    mb1 = gpu0.pop(i1)
    gpu0.insert(i0, mb1)
    check(table)  # without the rule the table runs ...
    with pytest.raises(ScheduleError, match="l0.s0.mb1.COMPUTE runs before l0.s0.mb0.COMPUTE"):
        check(table, kv_constraints(TWO_LAYERS))  # ... and computes the wrong attention


@pytest.mark.parametrize("kind", ["gpipe", "asready"])
def test_every_layer_keeps_its_chunks_in_order(kind):
    for spec in (TWO_LAYERS, TWO_LAYERS.replace(model={"batch_size": 2, "seq_len": 7},
                                                schedule={"micro_batches": 5})):
        table = build(spec, kind)
        order = [(a.layer, a.micro_batch) for a in table[0] if a.kind is Kind.COMPUTE and a.stage == 0]
        for a, b in Batch.of_spec(spec).kv_order():
            for layer in range(2):
                assert order.index((layer, a)) < order.index((layer, b))


def test_the_block_keeps_its_ids():
    assert all(a.layer is None and not a.id.startswith("l") for acts in build(load_spec(TINY_CONFIG)).values()
               for a in acts)
