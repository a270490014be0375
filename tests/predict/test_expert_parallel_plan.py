"""Expert-parallel predictions, with the expected counts written out by hand: expected rows and
pairs under uniform routing, message bytes (count + rows), traffic, FLOPs, weights; measured
routing; load-balanced placements; the search's expert-count candidates; the layout verdict."""

import pytest
import torch

from pyengine.core.spec import load_spec
from pyengine.model.payloads import Payload
from pyengine.model.routing import MeasuredRouting, Routing
from pyengine.model.stages import StageKind, rank_flops, stages_of
from pyengine.predict.ep_layouts import count_candidates, place
from pyengine.predict.planner import plan
from pyengine.predict.resources import traffic, weight_bytes
from pyengine.predict.roofline import message_bytes
from pyengine.predict.search import search
from pyengine.schedule import Kind, build
from helpers import small_spec

# T=30 (m=3: 10 tokens each), H=16, F=24, E=6, k=2, V=50, fp32; experts 0 | 1,2 | 3,4,5 on GPUs
# 0 | 1 | 2, output on GPU 2.
ODD = small_spec(model={"batch_size": 1, "seq_len": 30, "hidden_size": 16, "ffn_hidden_size": 24,
                        "num_experts": 6, "vocab_size": 50},
                 experts={"gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[0], [1, 2], [3, 4, 5]]},
                 output=2, schedule={"micro_batches": 3})


def test_expected_rows_and_pairs_under_uniform_routing():
    ep = stages_of(ODD)[StageKind.EXPERTS]
    # a GPU with n of the 6 experts gets the tokens with >= 1 of their 2 experts there:
    # 1 - C(6-n, 2)/C(6, 2) = 1/3, 3/5, 4/5 for n = 1, 2, 3
    assert [ep.rows_for(r, 10) for r in (0, 1, 2)] == pytest.approx([10 / 3, 6, 8])
    assert [ep.pairs_for(r, 10) for r in (0, 1, 2)] == pytest.approx([10 / 3, 20 / 3, 10])


def test_message_bytes_count_plus_rows():
    table = build(ODD)
    by_id = {(a.rank, a.id): a for acts in table.values() for a in acts}
    # dispatch row: u 16 x 4 B + [token, 2 slots] 3 x 4 B + 2 weights x 4 B = 84 B; count 8 B
    assert message_bytes(ODD, by_id[(0, "s0.mb0.SEND.dispatch->1")]) == pytest.approx(8 + 6 * 84)
    assert message_bytes(ODD, by_id[(2, "s1.mb1.RECV.dispatch<-0")]) == pytest.approx(8 + 8 * 84)
    # combine row: y 16 x 4 B + token 4 B = 68 B, sized by the sending expert GPU
    assert message_bytes(ODD, by_id[(0, "s1.mb0.SEND.combine->2")]) == pytest.approx(8 + 10 / 3 * 68)
    assert message_bytes(ODD, by_id[(2, "s2.mb2.RECV.combine<-1")]) == pytest.approx(8 + 6 * 68)
    assert not any(a.kind is Kind.REDUCE for acts in table.values() for a in acts)
    assert Payload.DISPATCH.nbytes(ODD, 1) == 84 and Payload.COMBINE.nbytes(ODD, 1) == 68


def test_traffic_per_peer():
    sent, recv = traffic(ODD, build(ODD))
    resid = 10 * 16 * 4
    assert sent[0] == pytest.approx({1: 3 * (8 + 6 * 84), 2: 3 * (8 + 8 * 84 + resid + 8 + 10 / 3 * 68)})
    assert sent[1] == pytest.approx({2: 3 * (8 + 6 * 68)})
    assert sent[2] == {}  # its experts' rows stay on the output GPU
    assert recv[2] == pytest.approx({0: sent[0][2], 1: sent[1][2]})


def test_flops_and_weights():
    f = rank_flops(ODD)
    expert = 6 * 16 * 24  # FLOPs per (token, expert) pair
    assert f[0] == pytest.approx(2 * 30 * 16 * 6 + expert * 30 * 2 * 1 / 6)  # router + 1/6 of the pairs
    assert f[1] == pytest.approx(expert * 30 * 2 * 2 / 6)
    assert f[2] == pytest.approx(expert * 30 * 2 * 3 / 6 + 2 * 30 * 16 * 50)  # + output head
    assert sum(f.values()) == pytest.approx(2 * 30 * 16 * 6 + 6 * 30 * 2 * 16 * 24 + 2 * 30 * 16 * 50)
    w = weight_bytes(ODD)
    assert w[1] == {"w_gate": 2 * 16 * 24 * 4, "w_up": 2 * 16 * 24 * 4, "w_down": 2 * 24 * 16 * 4}
    assert sum(w[0].values()) == 50 * 16 * 4 + 16 * 4 + 16 * 6 * 4 + 3 * 16 * 24 * 4
    assert plan(ODD).gpus[1].parts == ["experts 1-2"]


def test_measured_routing_shares():
    ids = torch.tensor([[0, 1], [1, 0], [2, 3], [0, 5]])
    r = MeasuredRouting.from_ids(ids, 6)
    assert r.pair_share([0, 1]) == 5 / 8 and r.token_share([0, 1]) == 3 / 4  # pairs 2 + 2 + 1
    assert r.token_share([5]) == 1 / 4 and r.pair_share([4]) == 0
    assert r.expert_loads() == (3 / 8, 2 / 8, 1 / 8, 1 / 8, 0, 1 / 8)
    assert Routing(6, 2).token_share([0, 1, 2, 3, 4, 5]) == 1.0


def test_load_balanced_placement_spreads_hot_experts():
    r = MeasuredRouting(6, 1, (((0,), 4), ((1,), 1), ((2,), 1), ((3,), 2), ((4,), 1), ((5,), 1)), 10)
    assert place((2, 2, 2), r) == ((0, 5), (3, 4), (1, 2))  # loads 0.5 / 0.3 / 0.2
    assert place((1, 2, 3), Routing(6, 1)) == ((0,), (1, 2), (3, 4, 5))  # uniform: contiguous


def test_count_candidates_balance_the_router_gpu():
    seed = load_spec()
    cands = count_candidates(seed, plan(seed).device, [0, 1, 2], 0)
    assert (3, 3, 2) in cands  # the near-even split is always tried
    assert all(sum(c) == 8 and min(c) >= 1 for c in cands)
    assert len(cands) <= 3 ** 3 + 1


def test_search_ranks_tensor_and_expert_layouts_together():
    res = search(ODD, micro_batches=(1, 3), kinds=("gpipe",))
    assert res.considered["expert"] > 0 and res.considered["tensor"] > 0
    assert any(c.spec.expert_parallel for c in res) and any(not c.spec.expert_parallel for c in res)
    assert sorted(c.rank_latency for c in res) == list(range(1, len(res) + 1))


def test_search_scales_to_128_experts():
    big = load_spec().replace(model={"hidden_size": 2048, "ffn_hidden_size": 768, "num_experts": 128,
                                     "top_k": 8, "vocab_size": 151936})
    res = search(big, "h100", micro_batches=(1, 4), kinds=("gpipe",), boundaries=("all_reduce",))
    ep = [c for c in res if c.spec.expert_parallel]
    assert ep and res.considered["expert_count_vectors"] <= 6 * (3 ** 3 + 1)
    assert all(sum(len(p) for p in c.spec.expert_placement()) == 128 for c in ep)


def test_layout_verdict_compares_tp_and_ep():
    p = plan(load_spec(), "h100")
    v = next(v for v in p.verdicts if v.claim.startswith("layout:"))
    assert v.claim == "layout: TP=2 on GPUs 1,2"
    labels = [o.label for o in p.layouts]
    assert labels[0] == "TP=2 on GPUs 1,2" and any(x.startswith("EP on GPUs 1,2") for x in labels)
    assert any(x.startswith("EP on GPUs 0,1,2") for x in labels)
    best = min(p.layouts, key=lambda o: o.latency_s)
    assert (v.holds is True) == best.this or v.holds is None


def test_balanced_counts_keep_one_expert_on_an_overloaded_gpu():
    """A large-vocabulary head makes GPU 0's fixed work exceed the balanced level: it keeps the
    minimum of one expert and the rest is shared (the counts still sum to E)."""
    from pyengine.model.hf_config import deployment_spec, read_hf_config
    from pyengine.predict.devices import load_profile
    from pyengine.predict.ep_layouts import balanced_counts, round_counts
    from helpers import packaged_config

    qwen = deployment_spec(read_hf_config(packaged_config("hf/qwen3-30b-a3b")), None)
    ideal = balanced_counts(qwen, load_profile("seed32g"), [0, 1, 2], 0)
    assert ideal[0] == 1.0 and sum(ideal) == pytest.approx(128) and abs(ideal[1] - ideal[2]) < 1
    assert (1, 63, 64) in count_candidates(qwen, load_profile("seed32g"), [0, 1, 2], 0)
    assert round_counts((0.3, 2.6, 5.1), 8) == (1, 2, 5) and round_counts((1.0, 3.5, 3.5), 8) in {(1, 4, 3), (1, 3, 4)}


def test_layout_alternatives_tie_break_on_balance():
    from pyengine.model.hf_config import deployment_spec, read_hf_config
    from helpers import packaged_config

    qwen = deployment_spec(read_hf_config(packaged_config("hf/qwen3-30b-a3b")), None)
    labels = [o.label for o in plan(qwen, "seed32g").layouts]
    assert "EP on GPUs 1,2 (64/64 experts)" in labels  # not 63/65: GPU 0 bottlenecks all of them
