"""Decode pricing (pyengine.predict.decode) and the ping-pong verdict (disaggregation), by hand:
the expert weight bytes a step streams (each held expert only when a group's tokens chose it),
the mean step and throughput, the fastest group count, and the attention / experts balance."""

import pytest

from helpers import small_spec
from pyengine.predict import decode, disaggregation
from pyengine.predict.devices import PRESETS

DEVICE = PRESETS["seed32g"]
# E 5, k 2, H 24, F 29, fp32, 2 layers; GPU 1 holds experts 0-2, GPU 2 experts 3-4; 4 sequences
# of 6 tokens decode in 2 groups of 2.
EP = small_spec(experts={"parallel_mode": "expert", "gpus": [1, 2], "expert_ids": [[0, 1, 2], [3, 4]]},
                model={"batch_size": 4, "seq_len": 6, "num_layers": 2, "num_attention_heads": 4,
                       "num_key_value_heads": 2},
                schedule={"micro_batches": 2})
EXPERT_BYTES = 3 * 24 * 29 * 4 * 2  # w_gate, w_up, w_down of one expert, fp32, in both layers


def test_weight_bytes_per_step_stream_only_the_experts_a_group_chose():
    # a group of 2 tokens leaves an expert unchosen with probability (1 - 2/5)^2 = 0.36
    touched_per_group = 1 - 0.36
    want = {1: EXPERT_BYTES * 3 * touched_per_group * 2, 2: EXPERT_BYTES * 2 * touched_per_group * 2}
    assert decode.weight_bytes_per_step(EP) == pytest.approx(want, rel=1e-12)


def test_weight_bytes_per_step_under_tp_slice_every_expert():
    # TP over GPUs 1-2 (F 29 split 14/15 by the near-even rule): each GPU holds all 5 experts'
    # slices; 4 sequences in 1 group of 4 tokens leave an expert unchosen with (3/5)^4
    tp = small_spec(model={"batch_size": 4, "seq_len": 6}, schedule={"micro_batches": 1})
    touched = 5 * (1 - 0.6 ** 4)
    cols = {1: 14, 2: 15}
    want = {r: 3 * 24 * c * 4 * touched for r, c in cols.items()}
    assert decode.weight_bytes_per_step(tp) == pytest.approx(want, rel=1e-12)


@pytest.fixture
def linear_steps(monkeypatch):
    """Step time 1 ms per cached position plus 10 ms per group beyond the first: more groups cost
    more here, so one group is fastest; alternatives off (priced elsewhere)."""
    def step_s(spec, device, position, routing=None):
        return 1e-3 * position + 1e-2 * (spec.schedule.micro_batches - 1)

    monkeypatch.setattr(decode, "step_s", step_s)
    monkeypatch.setattr(decode, "alternatives", lambda spec, device, routing=None: [])


def test_mean_step_and_throughput(linear_steps):
    plan = decode.decode_plan(EP, DEVICE, new_tokens=5)
    # first step at position 6, last at 6 + 5 - 1 = 10, both with 2 groups (+10 ms)
    assert (plan.first_step_s, plan.last_step_s) == pytest.approx((0.016, 0.020))
    assert plan.mean_step_s == pytest.approx(0.018)
    assert plan.tokens_per_s == pytest.approx(4 / 0.018)  # 4 sequences, one token each per step


def test_the_fastest_group_count_is_picked(linear_steps):
    plan = decode.decode_plan(EP, DEVICE, new_tokens=5)
    # candidates up to the 4 sequences: m = 1, 2, 3, 4 -> mean 8, 18, 28, 38 ms
    assert plan.by_groups == pytest.approx({1: 0.008, 2: 0.018, 3: 0.028, 4: 0.038})
    assert plan.best_groups == 1


def _fake_sides(attention_s: float, experts_s: float, latencies: dict):
    """sides and predict of disaggregation at fixed numbers: busy times per side, latency per m."""
    class Pred:
        def __init__(self, m):
            self.latency_s, self.throughput_tokens_per_s = latencies[m], 1.0 / latencies[m]

    return (lambda spec, device, routing=None: (attention_s * spec.schedule.micro_batches, experts_s),
            lambda spec, device, routing=None: (Pred(spec.schedule.micro_batches), None))


def test_ping_pong_balance_is_attention_over_experts(monkeypatch):
    sides, predict = _fake_sides(3.0, 2.0, {1: 5.0, 2: 4.0, 3: 4.5, 4: 6.0, 6: 7.0, 8: 8.0, 16: 9.0})
    monkeypatch.setattr(disaggregation, "sides", sides)
    monkeypatch.setattr(disaggregation, "predict", predict)
    spec = EP.replace(model={"batch_size": 8, "seq_len": 2})  # 16 tokens: every candidate m
    pp = disaggregation.ping_pong(spec.replace(schedule={"micro_batches": 1}), DEVICE)
    # m = 1: attention 3 s, experts 2 s per batch: the attention side bounds it, 1.5x
    assert (pp.attention_s, pp.experts_s, pp.bound_by, pp.balance) == (3.0, 2.0, "attention", 1.5)
    assert pp.by_m[2] == (4.0, 0.25, 3.0)  # m = 2: attention 6 s over experts 2 s
    assert pp.best_m == 2  # the lowest latency


def test_ping_pong_bound_by_the_experts(monkeypatch):
    sides, predict = _fake_sides(1.0, 4.0, {m: 1.0 for m in disaggregation.CANDIDATE_M})
    monkeypatch.setattr(disaggregation, "sides", sides)
    monkeypatch.setattr(disaggregation, "predict", predict)
    pp = disaggregation.ping_pong(EP.replace(schedule={"micro_batches": 1}), DEVICE)
    assert (pp.bound_by, pp.balance) == ("experts", 0.25)


def test_measured_balance_is_attention_over_the_busiest_expert_gpu():
    """The run's own figure, from a timeline: attention 3 ms on rank 0 (two spans, one
    overlapping), experts 1 ms on rank 1 and 2 ms on rank 2 (the busiest), comm not counted."""
    from pyengine.core.timeline import Span, Timeline
    from pyengine.report.ping_pong import summarize_ping_pong

    def compute(rank, stage, start_ms, end_ms):
        return Span(rank, "compute", f"s{stage}", "COMPUTE", stage, 0, start_ms * 1e-3, end_ms * 1e-3)

    tl = Timeline([compute(0, 0, 0, 2), compute(0, 0, 1, 3), compute(1, 1, 3, 4), compute(2, 1, 3, 5),
                   Span(2, "comm", "send", "SEND", 1, 0, 0.0, 9e-3)], 9e-3)
    s = summarize_ping_pong(EP, tl, tl, device="cpu")  # no profile for a CPU: no prediction
    assert s.balance == s.balance_replayed == pytest.approx(1.5)
    assert s.balance_predicted is None
