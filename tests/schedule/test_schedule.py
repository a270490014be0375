"""Schedule tables: every built table checks; sends match receives; broken tables are rejected."""

from collections import Counter

import pytest

from helpers import TINY_CONFIG, uneven_seed
from pyengine.core.spec import load_spec
from pyengine.model.payloads import Payload
from pyengine.schedule import Action, Kind, ScheduleError, build, check

SEED = load_spec(None)
TINY = load_spec(TINY_CONFIG)
UNEVEN = uneven_seed()

EP_GPU0 = SEED.replace(parallel={"stages": [
    {"name": "embed", "gpus": [0]},
    {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[7], [0, 1, 2], [3, 4, 5, 6]]},
    {"name": "output", "gpus": [1]}]}, schedule={"micro_batches": 3})
EP_12 = TINY.replace(parallel={"stages": [
    {"name": "embed", "gpus": [0]}, {"name": "experts", "gpus": [1, 2], "parallel_mode": "expert"},
    {"name": "output", "gpus": [0]}]})

SPECS = {"seed": SEED, "tiny": TINY, "uneven": UNEVEN, "ep_gpu0": EP_GPU0, "ep_12": EP_12,
         "seed_m1": SEED.replace(schedule={"micro_batches": 1}),
         "seed_m7": SEED.replace(schedule={"micro_batches": 7})}


def _variants():
    for name, spec in SPECS.items():
        for boundary in ("all_reduce", "reduce_scatter", "partials"):
            for kind in ("gpipe", "asready"):
                yield pytest.param(spec.replace(comm={"boundary": boundary}), kind, id=f"{name}-{boundary}-{kind}")


@pytest.mark.parametrize("spec,kind", list(_variants()))
def test_tables_check_and_messages_match(spec, kind):
    table = build(spec, kind)
    check(table)
    sends = Counter((a.rank, a.peers[0], a.payload, a.micro_batch) for acts in table.values() for a in acts
                    if a.kind is Kind.SEND)
    recvs = Counter((a.peers[0], a.rank, a.payload, a.micro_batch) for acts in table.values() for a in acts
                    if a.kind is Kind.RECV)
    assert sends == recvs
    # every micro-batch's compute appears once per rank of each stage
    computes = Counter((a.rank, a.stage, a.micro_batch) for acts in table.values() for a in acts
                       if a.kind is Kind.COMPUTE)
    expect = {(g, s, mb) for s, st in enumerate(spec.parallel.stages) for g in st.gpus
              for mb in range(spec.schedule.micro_batches)}
    assert set(computes) == expect and set(computes.values()) == {1}
    # every message carries a payload with a non-empty layout
    sizes = spec.micro_batch_sizes()
    for (_src, _dst, payload, mb), _n in sends.items():
        assert payload.nbytes(spec, sizes[mb]) > 0


def _seed_table():
    return {r: list(v) for r, v in build(SEED).items()}


def _index(acts, pred):
    return next(i for i, a in enumerate(acts) if pred(a))


def test_swapped_recv_order_rejected():
    t = _seed_table()
    i = _index(t[1], lambda a: a.id == "s1.mb0.RECV.act<-0")
    j = _index(t[1], lambda a: a.id == "s1.mb1.RECV.act<-0")
    t[1][i], t[1][j] = t[1][j], t[1][i]
    with pytest.raises(ScheduleError, match="message mismatch|depends on"):
        check(t)


def test_missing_recv_rejected():
    t = _seed_table()
    i = _index(t[2], lambda a: a.kind is Kind.RECV and a.micro_batch == 3)
    del t[2][i]
    with pytest.raises(ScheduleError):
        check(t)


def test_dep_that_comes_later_rejected():
    t = _seed_table()
    i = _index(t[1], lambda a: a.id == "s1.mb0.COMPUTE")
    comp = t[1].pop(i)
    t[1].insert(0, comp)
    with pytest.raises(ScheduleError, match="does not come earlier"):
        check(t)


def test_half_issued_collective_rejected():
    t = _seed_table()
    i = _index(t[2], lambda a: a.kind is Kind.REDUCE and a.micro_batch == 0)
    del t[2][i]
    with pytest.raises(ScheduleError, match="collective mismatch|deadlock"):
        check(t)


def test_cyclic_wait_rejected():
    a0 = Action(0, Kind.RECV, 0, 0, Payload.ACT, (1,))
    a1 = Action(1, Kind.RECV, 0, 0, Payload.ACT, (0,))
    t = {0: [a0, Action(0, Kind.SEND, 0, 0, Payload.ACT, (1,))],
         1: [a1, Action(1, Kind.SEND, 0, 0, Payload.ACT, (0,))]}
    with pytest.raises(ScheduleError, match="deadlock"):
        check(t)


def test_action_in_wrong_table_rejected():
    t = _seed_table()
    t[0].append(Action(1, Kind.COMPUTE, 1, 9))
    with pytest.raises(ScheduleError, match="sits in rank 0"):
        check(t)


def test_unknown_kind_rejected():
    with pytest.raises(ScheduleError, match=r"must be one of \['gpipe', 'asready'\]"):
        build(SEED, "1f1b")


def test_expert_parallel_tables_move_only_routed_payloads():
    for spec in (EP_GPU0, EP_12):
        for kind in ("gpipe", "asready"):
            table = build(spec, kind)
            moved = {a.payload for acts in table.values() for a in acts if a.kind is not Kind.COMPUTE}
            assert moved <= {Payload.DISPATCH, Payload.COMBINE, Payload.RESID}
            assert not any(a.kind is Kind.REDUCE for acts in table.values() for a in acts)
    # the router's own experts take their rows without a message: no dispatch 0 -> 0
    table = build(EP_GPU0)
    assert not any(a.kind is Kind.SEND and a.peers == (0,) for a in table[0])
    assert {a.id for a in table[1] if a.kind is Kind.RECV and a.micro_batch == 0} == {
        "s1.mb0.RECV.dispatch<-0", "s2.mb0.RECV.resid<-0", "s2.mb0.RECV.combine<-0",
        "s2.mb0.RECV.combine<-2"}  # GPU 1's own combine is its compute's value, not a message
