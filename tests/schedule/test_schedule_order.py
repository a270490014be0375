"""The order of the schedule tables themselves. Correct logits cannot show a wrong order (any
order that respects the data flow computes the same numbers), so the order is pinned here:

- per rank, the whole sequence of actions for the seed (m=4, all_reduce) and the tiny config
  (m=3, partials), written out by hand from the builder's rules (see each table's comment);
- the compute order where the two kinds differ (experts on every GPU, output on GPU 1);
- the properties each kind promises, on every layout, boundary and micro-batch count:
  gpipe runs all of an earlier stage before a later one, in micro-batch order; asready runs,
  whenever a rank is free, the oldest ready micro-batch (later stage first on ties) and never
  idles while one is ready; both issue the messages between a pair, and the collectives of a
  group, in one order on both sides, micro-batch by micro-batch.

"Ready" is the builder's own time model: a compute lasts its FLOPs (relative costs), messages
and reductions take no time. The replay that measures it is written here, not borrowed.
"""

import pytest

from helpers import TINY_CONFIG, uneven_seed
from pyengine.core.spec import load_spec
from pyengine.model.stages import stages_of
from pyengine.schedule import Kind, build

SEED = load_spec(None)
TINY = load_spec(TINY_CONFIG)
UNEVEN = uneven_seed()

# GPU 1 holds a small slice and the output: its output waits for GPU 2's large slice, while its
# next expert slice is ready much sooner.
SKEWED = UNEVEN.replace(parallel={"stages": [
    {"name": "embed", "gpus": [0]},
    {"name": "experts", "gpus": [0, 1, 2], "tensor_parallel_size": 3, "shard_fractions": [0.2, 0.2, 0.6]},
    {"name": "output", "gpus": [1]}]})


def ids(table):
    return {r: [a.id for a in acts] for r, acts in table.items()}


def computes(table):
    return {r: [(a.stage, a.micro_batch) for a in acts if a.kind is Kind.COMPUTE] for r, acts in table.items()}


# ---- whole tables, by hand ----------------------------------------------------------------------
# Seed, m=4 (256 tokens each): embed 16.8 MFLOP, experts 90.2 GFLOP per shard, output 67.1 GFLOP.
# GPU 0 embeds every micro-batch long before the first sum arrives, so both kinds give the same
# table: asready has nothing older that is ready while embeds remain. A SEND/RECV pair and a
# REDUCE enter the tables when their producing compute is placed; the sum is reduced once both
# shards have placed theirs and GPU 1 (the group's first member) sends it to GPU 0.
SEED_TABLE = {
    0: ["s0.mb0.COMPUTE", "s0.mb0.SEND.act->1", "s0.mb0.SEND.act->2",
        "s0.mb1.COMPUTE", "s0.mb1.SEND.act->1", "s0.mb1.SEND.act->2",
        "s2.mb0.RECV.sum<-1",
        "s0.mb2.COMPUTE", "s0.mb2.SEND.act->1", "s0.mb2.SEND.act->2",
        "s0.mb3.COMPUTE", "s0.mb3.SEND.act->1", "s0.mb3.SEND.act->2",
        "s2.mb0.COMPUTE", "s2.mb1.RECV.sum<-1",
        "s2.mb1.COMPUTE", "s2.mb2.RECV.sum<-1",
        "s2.mb2.COMPUTE", "s2.mb3.RECV.sum<-1",
        "s2.mb3.COMPUTE"],
    1: ["s1.mb0.RECV.act<-0", "s1.mb1.RECV.act<-0",
        "s1.mb0.COMPUTE", "s1.mb0.REDUCE.sum@1,2", "s1.mb0.SEND.sum->0",
        "s1.mb2.RECV.act<-0", "s1.mb3.RECV.act<-0",
        "s1.mb1.COMPUTE", "s1.mb1.REDUCE.sum@1,2", "s1.mb1.SEND.sum->0",
        "s1.mb2.COMPUTE", "s1.mb2.REDUCE.sum@1,2", "s1.mb2.SEND.sum->0",
        "s1.mb3.COMPUTE", "s1.mb3.REDUCE.sum@1,2", "s1.mb3.SEND.sum->0"],
    2: ["s1.mb0.RECV.act<-0", "s1.mb1.RECV.act<-0",
        "s1.mb0.COMPUTE", "s1.mb0.REDUCE.sum@1,2",
        "s1.mb2.RECV.act<-0", "s1.mb3.RECV.act<-0",
        "s1.mb1.COMPUTE", "s1.mb1.REDUCE.sum@1,2",
        "s1.mb2.COMPUTE", "s1.mb2.REDUCE.sum@1,2",
        "s1.mb3.COMPUTE", "s1.mb3.REDUCE.sum@1,2"],
}

# Tiny, m=3 (16 tokens each), partials: embed 7680 FLOP, experts 147456 (GPU 1, F 16) and
# 221184 (GPU 2, F 24), output 155136. Each shard sends its partial to GPU 0 as soon as it
# computes it; GPU 0's output waits for the slower GPU 2, so again both kinds agree.
TINY_TABLE = {
    0: ["s0.mb0.COMPUTE", "s0.mb0.SEND.act->1", "s0.mb0.SEND.act->2",
        "s0.mb1.COMPUTE", "s0.mb1.SEND.act->1", "s0.mb1.SEND.act->2",
        "s2.mb0.RECV.partial<-1", "s2.mb0.RECV.partial<-2",
        "s0.mb2.COMPUTE", "s0.mb2.SEND.act->1", "s0.mb2.SEND.act->2",
        "s2.mb1.RECV.partial<-1",
        "s2.mb0.COMPUTE", "s2.mb1.RECV.partial<-2", "s2.mb2.RECV.partial<-1",
        "s2.mb1.COMPUTE", "s2.mb2.RECV.partial<-2",
        "s2.mb2.COMPUTE"],
    1: ["s1.mb0.RECV.act<-0", "s1.mb1.RECV.act<-0",
        "s1.mb0.COMPUTE", "s1.mb0.SEND.partial->0",
        "s1.mb2.RECV.act<-0",
        "s1.mb1.COMPUTE", "s1.mb1.SEND.partial->0",
        "s1.mb2.COMPUTE", "s1.mb2.SEND.partial->0"],
    2: ["s1.mb0.RECV.act<-0", "s1.mb1.RECV.act<-0",
        "s1.mb0.COMPUTE", "s1.mb0.SEND.partial->0",
        "s1.mb2.RECV.act<-0",
        "s1.mb1.COMPUTE", "s1.mb1.SEND.partial->0",
        "s1.mb2.COMPUTE", "s1.mb2.SEND.partial->0"],
}


@pytest.mark.parametrize("kind", ["gpipe", "asready"])
@pytest.mark.parametrize("name,spec,want", [("seed", SEED, SEED_TABLE), ("tiny", TINY, TINY_TABLE)])
def test_whole_tables_by_hand(name, spec, want, kind):
    assert ids(build(spec, kind)) == want


# Experts on all three GPUs (F 2867/5735/5734), output on GPU 1, m=3 (342/341/341 tokens):
# gpipe keeps each rank's stages apart; asready interleaves them. GPU 0's own expert slice of
# micro-batch i is ready (its input is local) before the next embed and is older, so it runs
# first; GPU 1's output of micro-batch i is ready the moment its own (largest) slice finishes,
# and is older than the next expert slice.
UNEVEN_COMPUTES = {
    "gpipe": {0: [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)],
              1: [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)],
              2: [(1, 0), (1, 1), (1, 2)]},
    "asready": {0: [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2), (1, 2)],
                1: [(1, 0), (2, 0), (1, 1), (2, 1), (1, 2), (2, 2)],
                2: [(1, 0), (1, 1), (1, 2)]},
}


@pytest.mark.parametrize("kind", ["gpipe", "asready"])
def test_compute_order_where_the_kinds_differ(kind):
    assert computes(build(UNEVEN, kind)) == UNEVEN_COMPUTES[kind]


# ---- properties, every variant ------------------------------------------------------------------
def _variants():
    specs = {"seed": SEED, "tiny": TINY, "uneven": UNEVEN, "skewed": SKEWED,
             "seed_m1": SEED.replace(schedule={"micro_batches": 1}),
             "seed_m7": SEED.replace(schedule={"micro_batches": 7}),
             "tiny_m5": TINY.replace(schedule={"micro_batches": 5})}
    for name, spec in specs.items():
        for boundary in ("all_reduce", "reduce_scatter", "partials"):
            for kind in ("gpipe", "asready"):
                yield pytest.param(spec.replace(comm={"boundary": boundary}), kind,
                                   id=f"{name}-{boundary}-{kind}")


VARIANTS = list(_variants())


def _ready_times(spec, table):
    """Replay the table in the builder's time model: a compute on its rank's lane, in table
    order, lasting its FLOPs; messages and reductions instant. Returns, per rank, for each
    compute in table order: (stage, mb, lane free before it, its ready time)."""
    stages = stages_of(spec)
    sizes = spec.micro_batch_sizes()
    by_key = {(r, a.key): a for r, acts in table.items() for a in acts}
    comp_list = {r: [a for a in acts if a.kind is Kind.COMPUTE] for r, acts in table.items()}
    end: dict = {}

    def ready(rank, key):  # when the value of action `key` on `rank` exists
        a = by_key[(rank, key)]
        if a.kind is Kind.COMPUTE:
            return finish(rank, comp_list[rank].index(a))
        if a.kind is Kind.RECV:  # when its SEND's value exists on the sender
            src = a.peers[0]
            send = next(s for s in table[src] if s.kind is Kind.SEND and s.peers == (rank,)
                        and s.payload == a.payload and s.micro_batch == a.micro_batch)
            return max(ready(src, d) for d in send.deps)
        if a.kind is Kind.REDUCE:
            return max(ready(p, d) for p in a.peers for d in by_key[(p, key)].deps)
        return max(ready(rank, d) for d in a.deps)

    def finish(rank, i):
        if (rank, i) not in end:
            a = comp_list[rank][i]
            free = finish(rank, i - 1) if i else 0.0
            start = max([free] + [ready(rank, d) for d in a.deps])
            end[(rank, i)] = start + stages[a.stage].flops(sizes[a.micro_batch], rank)
        return end[(rank, i)]

    out = {}
    for r, comps in comp_list.items():
        rows = []
        for i, a in enumerate(comps):
            free = finish(r, i - 1) if i else 0.0
            at = max([0.0] + [ready(r, d) for d in a.deps])
            rows.append((a.stage, a.micro_batch, free, at))
        out[r] = rows
    return out


@pytest.mark.parametrize("spec,kind", VARIANTS)
def test_each_stage_runs_its_micro_batches_in_order(spec, kind):
    for r, seq in computes(build(spec, kind)).items():
        for s in {s for s, _ in seq}:
            assert [mb for st, mb in seq if st == s] == list(range(spec.schedule.micro_batches)), (r, s)


@pytest.mark.parametrize("spec,kind", [v for v in VARIANTS if v.values[1] == "gpipe"])
def test_gpipe_runs_earlier_stages_first_in_micro_batch_order(spec, kind):
    for r, seq in computes(build(spec, kind)).items():
        assert seq == sorted(seq), r


@pytest.mark.parametrize("spec,kind", [v for v in VARIANTS if v.values[1] == "asready"])
def test_asready_runs_the_oldest_ready_micro_batch(spec, kind):
    table = build(spec, kind)
    for r, rows in _ready_times(spec, table).items():
        for i, (s, mb, free, at) in enumerate(rows):
            ready_now = [(m2, -s2) for s2, m2, _, at2 in rows[i:] if at2 <= free]
            if ready_now:  # something is ready when the rank frees up: no idling, oldest first
                assert at <= free, f"rank {r} waits for s{s}.mb{mb} while {ready_now} are ready"
                assert (mb, -s) == min(ready_now), f"rank {r} runs s{s}.mb{mb}, not the oldest of {ready_now}"
            else:  # nothing is: it idles only until the first one is ready
                first = min(at2 for _, _, _, at2 in rows[i:])
                assert at == first, f"rank {r} idles until s{s}.mb{mb} at {at}; work was ready at {first}"


@pytest.mark.parametrize("spec,kind", VARIANTS)
def test_messages_and_collectives_in_one_order_on_both_sides(spec, kind):
    table = build(spec, kind)
    ranks = sorted(table)
    for src in ranks:
        for dst in ranks:
            sent = [(a.payload, a.micro_batch) for a in table[src] if a.kind is Kind.SEND and a.peers == (dst,)]
            got = [(a.payload, a.micro_batch) for a in table[dst] if a.kind is Kind.RECV and a.peers == (src,)]
            assert sent == got, (src, dst)
            for p in {p for p, _ in sent}:  # each payload's messages go micro-batch by micro-batch
                mbs = [mb for q, mb in sent if q == p]
                assert mbs == sorted(mbs), (src, dst, p)
    group = spec.stage("experts").gpus
    reduces = {r: [(a.payload, a.micro_batch, a.peers) for a in table[r] if a.kind is Kind.REDUCE] for r in group}
    first = reduces[group[0]]
    assert all(v == first for v in reduces.values())
    assert [mb for _, mb, _ in first] == (list(range(spec.schedule.micro_batches))
                                          if spec.comm.boundary != "partials" else [])


@pytest.mark.parametrize("spec,kind", VARIANTS)
def test_action_counts_in_closed_form(spec, kind):
    """Per rank and kind, how many actions the data flow needs, counted from the layout."""
    table = build(spec, kind)
    m = spec.schedule.micro_batches
    embed, group, out = spec.stage("embed").gpus[0], spec.stage("experts").gpus, spec.stage("output").gpus[0]
    b = spec.comm.boundary
    want = {r: {k: 0 for k in Kind} for r in table}
    want[embed][Kind.COMPUTE] += m
    want[out][Kind.COMPUTE] += m
    for g in group:
        want[g][Kind.COMPUTE] += m
        if g != embed:  # u + routing to every other shard
            want[embed][Kind.SEND] += m
            want[g][Kind.RECV] += m
    if out != embed:  # the residual x
        want[embed][Kind.SEND] += m
        want[out][Kind.RECV] += m
    if b != "partials":  # every member joins the group's collective
        for g in group:
            want[g][Kind.REDUCE] += m
    if b == "all_reduce":  # the sum is on every member: the first sends it, unless out holds it
        senders = [] if out in group else [group[0]]
    else:  # each member's chunk (reduce_scatter) or partial (partials), except out's own
        senders = [g for g in group if g != out]
    for g in senders:
        want[g][Kind.SEND] += m
        want[out][Kind.RECV] += m
    got = {r: {k: sum(a.kind is k for a in acts) for k in Kind} for r, acts in table.items()}
    assert got == want
