"""Simulator vs closed forms; timeline metrics; rendezvous semantics."""

import pytest

from pyengine.core.spec import load_spec
from pyengine.core.timeline import Span, Timeline
from pyengine.model.payloads import Payload
from pyengine.predict.roofline import op_costs as default_op_costs
from pyengine.predict.simulate import simulate
from pyengine.schedule import Action, Kind, ScheduleError, Table

SEED = load_spec(None)


def linear_pipeline(stages: int, micro_batches: int) -> Table:
    """A plain p-stage chain, rank i = stage i, GPipe order: rank i receives micro-batch j
    from rank i-1, computes it and sends it on (the seed's V placement puts GPU 0 in two
    stages, so it is not one): the case with closed forms."""
    table: Table = {r: [] for r in range(stages)}
    for r in range(stages):
        for mb in range(micro_batches):
            deps = ()
            if r > 0:
                recv = Action(r, Kind.RECV, r, mb, Payload.ACT, (r - 1,))
                table[r].append(recv)
                deps = (recv.key,)
            comp = Action(r, Kind.COMPUTE, r, mb, deps=deps)
            table[r].append(comp)
            if r < stages - 1:
                table[r].append(Action(r, Kind.SEND, r, mb, Payload.ACT, (r + 1,), (comp.key,)))
    return table


def _stage_costs(times):
    """Compute time per stage (= rank in a linear pipeline), zero comm."""
    return lambda a: times[a.stage] if a.kind is Kind.COMPUTE else 0.0


@pytest.mark.parametrize("p,m,t", [
    (1, 5, 1.0),  # one stage: no bubble
    (2, 1, 0.5),  # one micro-batch: pure chain
    (3, 4, 1.0),  # the seed's depth and m
    (4, 8, 0.25),
    (5, 16, 2.0),
])
def test_balanced_linear_pipeline_closed_form(p, m, t):
    tl = simulate(None, linear_pipeline(p, m), _stage_costs([t] * p))
    assert tl.makespan_s == (m + p - 1) * t
    for r in range(p):
        assert tl.busy(r) == pytest.approx(m / (m + p - 1))
    assert tl.bubble_fraction == pytest.approx((p - 1) / (m + p - 1))
    assert tl.utilization == pytest.approx(1 - tl.bubble_fraction)
    assert tl.exposed_comm_total_s == 0.0


@pytest.mark.parametrize("m", [1, 2, 4, 8])
@pytest.mark.parametrize("times", [
    [0.0625, 3.0, 1.5],  # seed-like: light stage 0, heavy experts, medium head
    [1.0, 3.0, 2.0],
    [4.0, 1.0, 1.0],  # bottleneck first
])
def test_imbalanced_chain(times, m):
    tl = simulate(None, linear_pipeline(len(times), m), _stage_costs(times))
    assert tl.makespan_s == pytest.approx(sum(times) + (m - 1) * max(times), rel=1e-12)
    for r, t in enumerate(times):
        assert tl.compute_s(r) == pytest.approx(m * t)


def _pair_table():
    """Two ranks: a long compute each and one short message with no dependency on it."""
    return {0: [Action(0, Kind.COMPUTE, 0, 0), Action(0, Kind.SEND, 0, 0, Payload.ACT, (1,))],
            1: [Action(1, Kind.COMPUTE, 1, 0), Action(1, Kind.RECV, 1, 0, Payload.ACT, (0,))]}


def _pair_costs(a):
    return 4.0 if a.kind is Kind.COMPUTE else 1.0


def test_exposed_comm_hidden_with_overlap():
    tl = simulate(None, _pair_table(), _pair_costs, overlap=True)
    assert tl.makespan_s == 4.0
    assert tl.exposed_comm_total_s == 0.0 and tl.comm_total_s == 2.0
    assert tl.hidden_comm_fraction == 1.0


def test_exposed_comm_equals_comm_without_overlap():
    tl = simulate(None, _pair_table(), _pair_costs, overlap=False)
    assert tl.makespan_s == 5.0
    assert tl.exposed_comm_total_s == tl.comm_total_s == 2.0
    assert tl.hidden_comm_fraction == 0.0


def test_seed_overlap_off_exposes_all_comm():
    off = simulate(SEED.replace(comm={"overlap": False}))
    assert off.exposed_comm_total_s == pytest.approx(off.comm_total_s)
    on = simulate(SEED)
    assert on.exposed_comm_total_s < on.comm_total_s
    assert on.makespan_s < off.makespan_s


@pytest.mark.parametrize("boundary", ["all_reduce", "reduce_scatter", "partials"])
@pytest.mark.parametrize("kind", ["gpipe", "asready"])
def test_seed_semantics(boundary, kind):
    spec = SEED.replace(comm={"boundary": boundary}, schedule={"kind": kind})
    tl = simulate(spec)
    by = {(s.rank, s.name): s for s in tl.spans}
    table_actions = {}
    from pyengine.schedule import build
    for r, acts in build(spec).items():
        for a in acts:
            table_actions[(r, a.id)] = a
            span = by[(r, a.id)]
            for d in a.deps:  # deps finish first
                assert by[(r, str(d))].end_s <= span.start_s + 1e-15
            if a.kind is Kind.SEND:  # rendezvous: same start and end on both sides
                recv = [s for s in tl.spans if s.rank == a.peers[0] and s.kind == "RECV"
                        and s.micro_batch == a.micro_batch and s.name.endswith(f"{a.payload.value}<-{r}")]
                assert len(recv) == 1
                assert (recv[0].start_s, recv[0].end_s) == (span.start_s, span.end_s)
            if a.kind is Kind.REDUCE:
                starts = {by[(p, a.id)].start_s for p in a.peers}
                assert len(starts) == 1
    # lanes run one action at a time, in table order
    for r in tl.ranks:
        for lane in ("compute", "comm"):
            spans = [s for s in tl.spans if s.rank == r and s.lane == lane]
            spans.sort(key=lambda s: s.start_s)
            assert all(x.end_s <= y.start_s + 1e-15 for x, y in zip(spans, spans[1:]))
    assert len(tl.spans) == len(table_actions)


def test_op_costs_mapping_and_missing_key():
    table = linear_pipeline(2, 2)
    costs = {"s0.mb0.COMPUTE": 1.0, "s0.mb1.COMPUTE": 1.0, (1, "s1.mb0.COMPUTE"): 2.0,
             "s1.mb1.COMPUTE": 2.0, "s0.mb0.SEND.act->1": 0.0, "s0.mb1.SEND.act->1": 0.0,
             "s1.mb0.RECV.act<-0": 0.0, "s1.mb1.RECV.act<-0": 0.0}
    assert simulate(None, table, costs).makespan_s == 1.0 + 2 * 2.0
    del costs["s1.mb1.COMPUTE"]
    with pytest.raises(ValueError, match="no entry for rank 1 action 's1.mb1.COMPUTE'"):
        simulate(None, table, costs)


def test_comm_cost_lengthens_chain():
    c = 0.125
    tl = simulate(None, linear_pipeline(3, 1), lambda a: 1.0 if a.kind is Kind.COMPUTE else c)
    assert tl.makespan_s == 3.0 + 2 * c


def test_broken_table_rejected():
    t = _pair_table()
    t[1] = [Action(1, Kind.RECV, 1, 0, Payload.ACT, (0,)), Action(1, Kind.SEND, 1, 0, Payload.ACT, (0,))]
    t[0] = [Action(0, Kind.RECV, 0, 0, Payload.ACT, (1,)), Action(0, Kind.SEND, 0, 0, Payload.ACT, (1,))]
    with pytest.raises(ScheduleError):
        simulate(None, t, _pair_costs)


def test_default_costs_scale_with_tokens():
    cost = default_op_costs(SEED, "seed32g")
    a = Action(1, Kind.COMPUTE, 1, 0)
    bigger = SEED.replace(schedule={"micro_batches": 1})
    assert default_op_costs(bigger, "seed32g")(a) > cost(a) > 0


def test_timeline_metrics_from_measured_spans():
    # overlapping compute spans count once; comm half covered by compute
    spans = [Span(0, "compute", "a", "COMPUTE", 0, 0, 10.0, 14.0),
             Span(0, "compute", "b", "COMPUTE", 0, 1, 12.0, 16.0),
             Span(0, "comm", "c", "SEND", 0, 0, 15.0, 18.0),
             Span(1, "compute", "d", "COMPUTE", 1, 0, 10.0, 12.0)]
    tl = Timeline.from_spans(spans)
    assert tl.makespan_s == 8.0 and tl.ranks == (0, 1)
    assert tl.compute_s(0) == 6.0 and tl.busy(0) == 0.75 and tl.busy(1) == 0.25
    assert tl.bubble_fraction == 0.5
    assert tl.comm_s(0) == 3.0 and tl.exposed_comm_s(0) == 2.0
    assert tl.hidden_comm_fraction == pytest.approx(1 / 3)
    assert set(tl.metrics()) >= {"busy", "bubble_fraction", "exposed_comm_s", "hidden_comm_fraction"}
