"""The token axis of a forward (pyengine.model.batch): chunks, segments, positions and the KV order,
checked against the rules written out by hand."""

import pytest

from pyengine.model.batch import Batch, Segment


def test_prefill_chunks_cut_sequences_and_carry_positions():
    b = Batch.prefill([4, 3], 3)  # 7 tokens -> chunks of 3, 2, 2
    assert b.sizes() == [3, 2, 2] and b.bounds() == [(0, 3), (3, 5), (5, 7)]
    assert [c.segments for c in b.chunks] == [
        (Segment(0, 0, 3, 0),),
        (Segment(0, 3, 4, 3), Segment(1, 4, 5, 0)),  # sequence 0 ends, sequence 1 starts
        (Segment(1, 5, 7, 1),)]
    assert b.positions() == [0, 1, 2, 3, 0, 1, 2]
    assert b.kv_order() == [(0, 1), (1, 2)]
    assert [c.last_rows for c in b.chunks] == [(), (0,), (1,)]  # rows 3 and 6 end their sequences


def test_attention_work_of_a_chunk():
    b = Batch.prefill([5], 2)  # chunks: positions 0-2, then 3-4
    c0, c1 = b.chunks
    assert (c0.attended, c0.keys_read) == (1 + 2 + 3, 3)
    assert (c1.attended, c1.keys_read) == (4 + 5, 5)


def test_decode_groups_sequences():
    b = Batch.decode([5, 2, 9, 1, 3], 2)  # 5 sequences, one new token each: groups of 3 and 2
    assert b.sizes() == [3, 2] and b.positions() == [5, 2, 9, 1, 3]
    assert [c.sequences for c in b.chunks] == [(0, 1, 2), (3, 4)]
    assert b.kv_order() == [] and b.lengths == (6, 3, 10, 2, 4)
    assert b.chunks[1].attended == 2 + 4 and not b.logits_all
    assert Batch.decode([4], 3).micro_batches == 1  # never more groups than sequences


@pytest.mark.parametrize("new,past,m", [((), (), 1), ((0,), (0,), 1), ((2,), (0,), 3), ((2,), (-1,), 1)])
def test_bad_batches_are_refused(new, past, m):
    with pytest.raises(ValueError):
        Batch(new, past, m)
