"""Planner, simulator, cost model, payload layouts and the comm harness must agree, and agree with
counts written out by hand here. Two configs:

SEED  T=1024 (m=4: 256 each), H=4096, F=14336 split 7168/7168 over GPUs 1-2, E=8, k=2,
      V=32000, bf16 (2 bytes); embed and output on GPU 0 (outside the experts group).
ODD   the seed's model with T=1021 (odd; m=3: 341/340/340), the experts 3-way over GPUs 0-2
      with fractions 0.2/0.3/0.5 (F 2867/4301/7168), output on GPU 1 (inside the group).
Each under every boundary (all_reduce, reduce_scatter, partials).

A multiply-add is 2 FLOPs; an expert's weights stream from HBM once per micro-batch for each of
the E (1 - (1 - k/E)^t) experts a micro-batch of t tokens is expected to touch (model/routing.py;
at t >= 256 that is all 8 to the last bit: 0.75^256 ~ 1e-32); ring collectives move bus factor x
buffer bytes to the ring successor: all-reduce 2(n-1)/n, reduce-scatter (n-1)/n (core/collectives.py).
"""

import pytest

from pyengine.commbench.harness import RankRow, combine
from pyengine.core.collectives import Collective
from pyengine.core.spec import load_spec
from pyengine.model.stages import rank_flops
from pyengine.predict import planner
from pyengine.predict.devices import load_profile
from pyengine.predict.resources import traffic
from pyengine.predict.roofline import compute_kernels, message_bytes
from pyengine.predict.simulate import simulate
from pyengine.schedule import Action, Kind, build

SEED = load_spec(None)
ODD = SEED.replace(model={"seq_len": 1021}, schedule={"micro_batches": 3}, parallel={"stages": [
    {"name": "embed", "gpus": [0]},
    {"name": "experts", "gpus": [0, 1, 2], "tensor_parallel_size": 3, "shard_fractions": [0.2, 0.3, 0.5]},
    {"name": "output", "gpus": [1]}]})
H, F, E, K, V, ES = 4096, 14336, 8, 2, 32000, 2
BOUNDARIES = ("all_reduce", "reduce_scatter", "partials")


def _spec(name, boundary):
    return {"seed": SEED, "odd": ODD}[name].replace(comm={"boundary": boundary})


def test_the_layouts_are_what_the_hand_counts_assume():
    assert SEED.micro_batch_sizes() == [256] * 4 and ODD.micro_batch_sizes() == [341, 340, 340]
    assert SEED.ffn_shards() == [(1, 0, 7168), (2, 7168, 14336)]
    assert ODD.ffn_shards() == [(0, 0, 2867), (1, 2867, 7168), (2, 7168, 14336)]


# ---- kernels of one micro-batch, by hand ----------------------------------------------------------
def test_seed_kernels_of_one_micro_batch():
    """t=256 tokens, 512 (token, expert) pairs, all 8 experts touched, F_r = 7168."""
    got = {s: [(k.name, k.flops, k.hbm_bytes) for k in compute_kernels(SEED, Action(r, Kind.COMPUTE, s, 1))]
           for s, r in ((0, 0), (1, 1), (2, 0))}
    assert got[0] == [
        ("embed_gather", 0, 256 * 8 + 2 * 256 * 4096 * 2),  # int64 ids in, rows read + x written
        ("rmsnorm_in", 0, 2 * 256 * 4096 * 2 + 4096 * 2),  # x in, u out, the gain
        ("router_gemm", 2 * 256 * 4096 * 8, 256 * 4096 * 2 + 4096 * 8 * 2 + 256 * 8 * 4),  # fp32 logits
        ("softmax_topk", 0, 256 * 8 * 4 + 256 * 2 * 8),  # logits in, int32 ids + fp32 weights out
    ]
    assert got[1] == [
        ("gate_up_swiglu", 4 * 512 * 4096 * 7168,
         2 * 8 * 4096 * 7168 * 2 + 512 * 4096 * 2 + 512 * 7168 * 2),  # w_gate + w_up, rows, act out
        ("down_combine", 2 * 512 * 7168 * 4096,
         8 * 7168 * 4096 * 2 + 512 * 7168 * 2 + 512 * 4096 * 2 + 256 * 4096 * 2),  # w_down, act, rows, y_r
    ]
    assert got[2] == [
        ("residual_sum_rmsnorm", 0, (2 + 1) * 256 * 4096 * 2 + 4096 * 2),  # x, one sum, normed out
        ("out_head_gemm", 2 * 256 * 4096 * 32000, 4096 * 32000 * 2 + 256 * 4096 * 2 + 256 * 32000 * 2),
    ]
    partials = SEED.replace(comm={"boundary": "partials"})
    (first, _) = compute_kernels(partials, Action(0, Kind.COMPUTE, 2, 3))
    assert first.hbm_bytes == (2 + 2) * 256 * 4096 * 2 + 4096 * 2  # both shards' partials read


def _per_rank(spec, field):
    table = build(spec)
    return {r: sum(getattr(k, field) for a in acts if a.kind is Kind.COMPUTE for k in compute_kernels(spec, a))
            for r, acts in table.items()}


# FLOPs per batch, by hand: router 2TH*E, experts 6 T k H F_r (gate + up + down), head 2TH*V.
FLOPS = {
    "seed": {0: 2 * 1024 * 4096 * 8 + 2 * 1024 * 4096 * 32000,
             1: 6 * 1024 * 2 * 4096 * 7168,
             2: 6 * 1024 * 2 * 4096 * 7168},
    "odd": {0: 2 * 1021 * 4096 * 8 + 6 * 1021 * 2 * 4096 * 2867,
            1: 6 * 1021 * 2 * 4096 * 4301 + 2 * 1021 * 4096 * 32000,
            2: 6 * 1021 * 2 * 4096 * 7168},
}


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("name", ["seed", "odd"])
def test_flops_per_rank_agree_everywhere(name, boundary):
    """The simulator's kernels summed over the table = the stages' rank_flops = the planner's
    per-GPU FLOPs = the hand count."""
    spec = _spec(name, boundary)
    want = FLOPS[name]
    assert _per_rank(spec, "flops") == want
    assert rank_flops(spec) == want
    assert {g.index: g.flops for g in planner.plan(spec).gpus} == want


def _experts_bytes(m, tokens, f):
    """HBM bytes of one shard (F_r = f) over a batch: weights once per micro-batch (all 8
    experts touched), plus per token: rows in, act out, act in, rows out (k=2 each), y_r."""
    return (m * (2 * 8 * 4096 * f * 2 + 8 * f * 4096 * 2)
            + tokens * (2 * 4096 * 2 + 2 * f * 2 + 2 * f * 2 + 2 * 4096 * 2 + 4096 * 2))


def _embed_bytes(m, tokens):
    return m * (4096 * 2 + 4096 * 8 * 2) + tokens * (8 + 2 * 4096 * 2 + 2 * 4096 * 2 + 4096 * 2
                                                     + 8 * 4 + 8 * 4 + 2 * 8)


def _output_bytes(m, tokens, reads):
    return m * (4096 * 2 + 4096 * 32000 * 2) + tokens * ((2 + reads) * 4096 * 2 + 4096 * 2 + 32000 * 2)


def _bytes_by_hand(name, boundary):
    if name == "seed":
        reads = 2 if boundary == "partials" else 1
        return {0: _embed_bytes(4, 1024) + _output_bytes(4, 1024, reads),
                1: _experts_bytes(4, 1024, 7168), 2: _experts_bytes(4, 1024, 7168)}
    reads = 3 if boundary == "partials" else 1
    return {0: _embed_bytes(3, 1021) + _experts_bytes(3, 1021, 2867),
            1: _experts_bytes(3, 1021, 4301) + _output_bytes(3, 1021, reads),
            2: _experts_bytes(3, 1021, 7168)}


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("name", ["seed", "odd"])
def test_hbm_bytes_per_rank_by_hand(name, boundary):
    assert _per_rank(_spec(name, boundary), "hbm_bytes") == _bytes_by_hand(name, boundary)


# ---- what moves between GPUs, by hand ----------------------------------------------------------------
ACT_ROW = 4096 * 2 + 2 * 4 + 2 * 4  # u (bf16) + k int32 ids + k fp32 weights, per token
ROW = 4096 * 2  # one token's x, partial or sum (bf16)


def test_message_bytes_of_every_payload_by_hand():
    table = build(ODD.replace(comm={"boundary": "reduce_scatter"}))
    got = {(r, a.id): message_bytes(ODD.replace(comm={"boundary": "reduce_scatter"}), a)
           for r, acts in table.items() for a in acts if a.kind is not Kind.COMPUTE and a.micro_batch == 0}
    assert got == {
        (0, "s0.mb0.SEND.act->1"): 341 * ACT_ROW, (0, "s0.mb0.SEND.act->2"): 341 * ACT_ROW,
        (1, "s1.mb0.RECV.act<-0"): 341 * ACT_ROW, (2, "s1.mb0.RECV.act<-0"): 341 * ACT_ROW,
        (0, "s0.mb0.SEND.resid->1"): 341 * ROW, (1, "s2.mb0.RECV.resid<-0"): 341 * ROW,
        # reduce-scatter of 341 rows over 3: chunks of ceil(341/3) = 114 rows, input padded to 342
        (0, "s1.mb0.REDUCE.half@0,1,2"): 342 * ROW, (1, "s1.mb0.REDUCE.half@0,1,2"): 342 * ROW,
        (2, "s1.mb0.REDUCE.half@0,1,2"): 342 * ROW,
        (0, "s1.mb0.SEND.half->1"): 114 * ROW, (1, "s2.mb0.RECV.half<-0"): 114 * ROW,
        (2, "s1.mb0.SEND.half->1"): 114 * ROW, (1, "s2.mb0.RECV.half<-2"): 114 * ROW,
    }


def _traffic_by_hand(name, boundary):
    """(sent, recv) per rank and peer, per batch."""
    sent = {0: {}, 1: {}, 2: {}}
    recv = {0: {}, 1: {}, 2: {}}

    def move(src, dst, nbytes):
        sent[src][dst] = sent[src].get(dst, 0) + nbytes
        recv[dst][src] = recv[dst].get(src, 0) + nbytes

    if name == "seed":  # 4 x 256 tokens; group (1, 2) -> output 0
        for dst in (1, 2):
            move(0, dst, 1024 * ACT_ROW)
        if boundary == "all_reduce":  # ring 1 -> 2 -> 1, factor 2(2-1)/2 = 1; GPU 1 sends the sum
            move(1, 2, 1 * 1024 * ROW)
            move(2, 1, 1 * 1024 * ROW)
            move(1, 0, 1024 * ROW)
        elif boundary == "reduce_scatter":  # factor 1/2; each sends its 128-row half
            move(1, 2, 1024 * ROW / 2)
            move(2, 1, 1024 * ROW / 2)
            move(1, 0, 4 * 128 * ROW)
            move(2, 0, 4 * 128 * ROW)
        else:
            move(1, 0, 1024 * ROW)
            move(2, 0, 1024 * ROW)
        return sent, recv
    # odd: 341 + 340 + 340 tokens; group (0, 1, 2) holds output 1; ring 0 -> 1 -> 2 -> 0
    for dst in (1, 2):
        move(0, dst, 1021 * ACT_ROW)
    move(0, 1, 1021 * ROW)  # the residual x
    if boundary == "all_reduce":  # factor 2(3-1)/3 = 4/3 of each sum; GPU 1 already holds it
        for src, dst in ((0, 1), (1, 2), (2, 0)):
            move(src, dst, 4 / 3 * 1021 * ROW)
    elif boundary == "reduce_scatter":  # factor 2/3 of the padded input (3 x 114 rows, every mb)
        for src, dst in ((0, 1), (1, 2), (2, 0)):
            move(src, dst, 2 / 3 * 3 * (3 * 114) * ROW)
        move(0, 1, 3 * 114 * ROW)
        move(2, 1, 3 * 114 * ROW)
    else:
        move(0, 1, 1021 * ROW)
        move(2, 1, 1021 * ROW)
    return sent, recv


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("name", ["seed", "odd"])
def test_traffic_per_peer_by_hand(name, boundary):
    spec = _spec(name, boundary)
    sent, recv = traffic(spec, build(spec))
    want_sent, want_recv = _traffic_by_hand(name, boundary)
    for r in (0, 1, 2):
        assert sent[r] == pytest.approx(want_sent[r], rel=1e-12), r
        assert recv[r] == pytest.approx(want_recv[r], rel=1e-12), r
    m = spec.schedule.micro_batches
    for g in planner.plan(spec).gpus:  # the plan reports the same, per micro-batch
        assert g.sent_per_peer == pytest.approx({p: b / m for p, b in sorted(want_sent[g.index].items())})
        assert g.recv_per_peer == pytest.approx({p: b / m for p, b in sorted(want_recv[g.index].items())})
        assert g.sent_bytes == int(sum(want_sent[g.index].values()))


# ---- one bus factor for the planner, the device model and the comm harness ------------------------
@pytest.mark.parametrize("collective,n,factor", [
    (Collective.ALL_REDUCE, 2, 1.0), (Collective.ALL_REDUCE, 3, 4 / 3),
    (Collective.REDUCE_SCATTER, 2, 1 / 2), (Collective.REDUCE_SCATTER, 3, 2 / 3),
    (Collective.BROADCAST, 3, 1.0), (Collective.SENDRECV, 3, 1.0),
])
def test_bus_factor_by_hand_in_the_comm_harness(collective, n, factor):
    assert collective.bus_factor(n) == pytest.approx(factor, rel=1e-15)
    rows = [[RankRow(size=3_000_000, count=1, time_us=1000.0, wrong=0)] for _ in range(n)]
    (row,) = combine(rows, collective.value, n)
    assert row["algbw_GBps"] == pytest.approx(3.0)  # 3 MB in 1 ms
    assert row["busbw_GBps"] == pytest.approx(3.0 * factor)


@pytest.mark.parametrize("boundary", ["all_reduce", "reduce_scatter"])
@pytest.mark.parametrize("name", ["seed", "odd"])
def test_each_reduction_moves_what_the_harness_and_device_model_say(name, boundary):
    """For every REDUCE of the table: the planner's bytes to the ring successor = the comm
    harness's bus bytes (busbw x time) for that buffer = the device model's bandwidth term."""
    spec = _spec(name, boundary)
    dev = load_profile("seed32g")
    bw, _ = dev.link("nvlink")
    table = build(spec)
    for r, acts in table.items():
        for a in acts:
            if a.kind is not Kind.REDUCE:
                continue
            n, buf = len(a.peers), message_bytes(spec, a)
            nxt = a.peers[(a.peers.index(r) + 1) % n]
            sent, _ = traffic(spec, {q: [x for x in table[q] if x.key == a.key] for q in table})
            planner_bytes = sent[r][nxt]
            (row,) = combine([[RankRow(buf, 1, 1e6, 0)]] * n, a.payload.collective.value, n)  # 1 s
            assert planner_bytes == pytest.approx(row["busbw_GBps"] * 1e9, rel=1e-12)
            latency_s = (dev.collective_base_us + a.payload.collective.ring_steps(n) * dev.collective_step_us) * 1e-6
            link_s = dev.collective_s(a.payload.collective, buf, n, "nvlink") - latency_s
            assert planner_bytes == pytest.approx(link_s * bw, rel=1e-12)


# ---- the simulator prices each action as the roofline of the hand counts says -----------------------
# seed32g: V100-class peaks with h100's calibrated efficiencies (pyengine/predict/presets.py).
SEED32G = dict(flops=125e12 * 794.5 / 989, hbm=900e9 * 0.8609, launch=5.6e-6, link=150e9 * 367.5 / 450,
               lat=3.7e-6, collective=3.5e-6, step=0.0, half_rows=225.5)


def _kernel_s(flops, nbytes, rows_per_expert=None):
    """launch + max(compute, memory); an expert GEMM's efficiency falls with its rows per expert m:
    eff x m / (m + half_rows)."""
    rate = SEED32G["flops"]
    if rows_per_expert is not None:
        rate *= rows_per_expert / (rows_per_expert + SEED32G["half_rows"])
    return SEED32G["launch"] + max(flops / rate, nbytes / SEED32G["hbm"])


def _action_s_by_hand(spec, a):
    """Seconds of one action on seed32g over NVLink, from the hand formulas above."""
    name = "seed" if spec.model.seq_len == 1024 else "odd"
    t = spec.micro_batch_sizes()[a.micro_batch]
    f = dict((r, b - s) for r, s, b in spec.ffn_shards())
    if a.kind is Kind.COMPUTE:
        pairs = 2 * t
        if a.stage == 0:
            ks = [(0, t * 8 + 2 * t * H * ES), (0, 2 * t * H * ES + H * ES),
                  (2 * t * H * E, t * H * ES + H * E * ES + t * E * 4), (0, t * E * 4 + t * K * 8)]
        elif a.stage == 1:
            fr, m = f[a.rank], pairs / E  # all 8 experts touched: 2t / 8 rows per expert
            return (_kernel_s(4 * pairs * H * fr, 2 * E * H * fr * ES + pairs * H * ES + pairs * fr * ES, m)
                    + _kernel_s(2 * pairs * fr * H, E * fr * H * ES + pairs * fr * ES + pairs * H * ES + t * H * ES, m))
        else:
            reads = (2 if name == "seed" else 3) if spec.comm.boundary == "partials" else 1
            ks = [(0, (2 + reads) * t * H * ES + H * ES), (2 * t * H * V, H * V * ES + t * H * ES + t * V * ES)]
        return sum(_kernel_s(fl, b) for fl, b in ks)
    n = len(a.peers)
    if a.kind is Kind.REDUCE:
        rows = t if a.payload.value == "sum" else -(-t // n) * n
        factor, steps = (2 * (n - 1) / n, 2 * (n - 1)) if a.payload.value == "sum" else ((n - 1) / n, n - 1)
        return SEED32G["collective"] + steps * SEED32G["step"] + factor * rows * ROW / SEED32G["link"]
    row = {"act": ACT_ROW, "resid": ROW, "sum": ROW, "partial": ROW}.get(a.payload.value)
    nbytes = t * row if row else -(-t // len(spec.stage("experts").gpus)) * ROW
    return SEED32G["lat"] + nbytes / SEED32G["link"]


@pytest.mark.parametrize("kind", ["gpipe", "asready"])
@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("name", ["seed", "odd"])
def test_simulated_spans_and_planned_busy_time_by_hand(name, boundary, kind):
    spec = _spec(name, boundary).replace(schedule={"kind": kind})
    table = build(spec)
    tl = simulate(spec, table, device="seed32g")
    actions = {(r, a.id): a for r, acts in table.items() for a in acts}
    assert len(tl.spans) == len(actions)
    for s in tl.spans:
        want = _action_s_by_hand(spec, actions[(s.rank, s.name)])
        assert s.end_s - s.start_s == pytest.approx(want, rel=1e-9), s.name
    busy = {r: sum(_action_s_by_hand(spec, a) for a in acts if a.kind is Kind.COMPUTE) for r, acts in table.items()}
    comm = {r: sum(_action_s_by_hand(spec, a) for a in acts if a.kind is not Kind.COMPUTE) for r, acts in table.items()}
    p = planner.plan(spec, "seed32g")
    assert {g.index: g.busy_s for g in p.gpus} == pytest.approx(busy, rel=1e-9)
    assert {g.index: g.comm_s for g in p.gpus} == pytest.approx(comm, rel=1e-9)
    for r in table:  # the timeline's lanes hold exactly those seconds
        assert tl.compute_s(r) == pytest.approx(busy[r], rel=1e-9)
    assert p.predicted.latency_s == tl.makespan_s
