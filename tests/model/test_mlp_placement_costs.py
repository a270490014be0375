"""parallel.dense_mlp_placement priced: the shared expert (S = 9) and a dense first layer's MLP (D = 11)
on the attention GPU, or split over the expert GPUs, pinned by hand-computed FLOPs, bytes and
weights (fp32, H = 48, t = 7 rows; TP 0.4/0.6 over GPUs 1 and 2, EP over GPUs 0, 1, 2); the spec's
refusals; and `plan`'s comparison of the two."""

import pytest

from helpers import TINY_CONFIG
from pyengine.core.spec import SpecError
from pyengine.core.spec import load_spec
from pyengine.model.stages import rank_flops, stages_of
from pyengine.predict.planner import plan
from pyengine.predict.resources import traffic
from pyengine.schedule import build

H, S, D, T, ES, K = 48, 9, 11, 7, 4, 2
ATTN = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
    "dense_layers": [0], "dense_ffn_size": D, "shared_expert_size": S})
EXP = ATTN.replace(parallel={"dense_mlp_placement": "experts"})
EP = EXP.replace(parallel={"stages": [
    {"name": "embed", "gpus": [0]}, {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert"},
    {"name": "output", "gpus": [0]}]})
# TP 0.4/0.6: S = 9 splits at round(3.6) = 4 -> 4 + 5 columns; D = 11 at round(4.4) = 4 -> 4 + 7
SHARED_COLS, DENSE_COLS = {1: 4, 2: 5}, {1: 4, 2: 7}


def kernels(spec, stage, rank, layer, t=T):
    return {k.name: k for k in stages_of(spec)[stage].kernels(t, rank, layer)}


def gemm(m, n, k):
    """(FLOPs, bytes) of [m, k] @ [k, n] in fp32, written out."""
    return 2 * m * n * k, (m * k + k * n + m * n) * ES


def test_on_the_attention_gpu_the_embed_stage_prices_them():
    shared = kernels(ATTN, 0, 0, 1)
    assert (shared["shared_gate_up"].flops, shared["shared_gate_up"].hbm_bytes) == gemm(T, 2 * S, H)
    assert (shared["shared_down"].flops, shared["shared_down"].hbm_bytes) == gemm(T, H, S)
    dense = kernels(ATTN, 0, 0, 0)
    assert (dense["dense_gate_up"].flops, dense["dense_down"].flops) == (2 * T * 2 * D * H, 2 * T * H * D)
    assert not any(n.startswith(("shared", "dense")) for n in kernels(ATTN, 1, 1, 1))
    assert stages_of(ATTN)[1].layers() == [1, 2]


@pytest.mark.parametrize("rank", [1, 2])
def test_on_the_expert_gpus_each_prices_its_columns(rank):
    s, d = SHARED_COLS[rank], DENSE_COLS[rank]
    moe = kernels(EXP, 1, rank, 1)
    assert (moe["shared_gate_up"].flops, moe["shared_gate_up"].hbm_bytes) == gemm(T, 2 * s, H)
    assert (moe["shared_down"].flops, moe["shared_down"].hbm_bytes) == gemm(T, H, s)
    assert moe["shared_add"].hbm_bytes == 3 * T * H * ES  # y_r + shared partial -> y_r
    assert "gate_up_swiglu" in moe  # beside the routed experts
    dense = kernels(EXP, 1, rank, 0)
    assert set(dense) == {"dense_gate_up", "dense_down"}  # a dense layer: its MLP's columns only
    assert (dense["dense_gate_up"].hbm_bytes, dense["dense_down"].hbm_bytes) == (gemm(T, 2 * d, H)[1], gemm(T, H, d)[1])
    w = stages_of(EXP)[1].weight_bytes(rank)
    assert w["ws_up"] == 2 * H * s * ES and w["ws_down"] == 2 * s * H * ES  # two MoE layers
    assert w["wd_gate"] == H * d * ES and w["w_up"] == 2 * 5 * H * (16 if rank == 1 else 24) * ES


def test_the_embed_stage_stops_pricing_them_and_sends_the_dense_layer_its_rows():
    assert not any(n.startswith(("shared", "dense")) for n in kernels(EXP, 0, 0, 1))
    dense = kernels(EXP, 0, 0, 0)
    assert "router_gemm" not in dense and dense["empty_routing"].hbm_bytes == T * K * 8  # ids -1, weights 0
    embed = stages_of(EXP)[0]
    assert embed.hand_off_from(1) == (0,) and stages_of(EXP)[1].layers() == [0, 1, 2]
    w = embed.weight_bytes(0)
    assert not any(n.startswith(("ws_", "wd_")) for n in w)


def test_the_planner_moves_exactly_the_mlp_flops_and_the_dense_layers_messages():
    tokens = ATTN.model.tokens  # 48, every layer
    mlp = 2 * (2 * tokens * 2 * S * H + 2 * tokens * H * S) + 2 * tokens * 2 * D * H + 2 * tokens * H * D
    a, e = rank_flops(ATTN), rank_flops(EXP)
    assert a[0] - e[0] == mlp == 12 * 48 * 48 * 9 + 6 * 48 * 48 * 11
    assert e[1] + e[2] - a[1] - a[2] == mlp
    sent_a, _ = traffic(ATTN, build(ATTN))
    sent_e, _ = traffic(EXP, build(EXP))
    act = tokens * (H * ES + K * 4 + K * 4)  # u, the (empty) top-k ids and weights, to each expert GPU
    assert sum(sent_e[0].values()) - sum(sent_a[0].values()) == 2 * act
    for r in (1, 2):  # each expert GPU's partial of the dense layer, back to the attention GPU
        assert sum(sent_e[r].values()) - sum(sent_a[r].values()) == tokens * H * ES


def test_expert_parallel_splits_them_near_evenly_over_every_expert_gpu():
    # S = 9 -> 3/3/3 columns, D = 11 -> 4/4/3; every GPU sees every token (t rows)
    for rank, s, d in ((0, 3, 4), (1, 3, 4), (2, 3, 3)):
        moe, dense = kernels(EP, 1, rank, 1), kernels(EP, 1, rank, 0)
        assert moe["shared_gate_up"].flops == 2 * T * 2 * s * H and moe["shared_down"].flops == 2 * T * H * s
        assert dense["dense_gate_up"].flops == 2 * T * 2 * d * H
        assert stages_of(EP)[1].rows_for(rank, T) == T
    assert stages_of(EP)[1].shard(2).shared_cols == (6, 9) and stages_of(EP)[1].shard(2).dense_cols == (8, 11)


def test_plan_prices_both_placements_and_gives_a_verdict():
    p = plan(EXP, "h100", new_tokens=2)
    mp = p.mlp_placement
    assert mp.this == "experts" and [o.where for o in mp.options] == ["attention", "experts"]
    assert mp.options[1].latency_s == p.predicted.latency_s
    assert mp.fastest in ("attention", "experts")
    assert any(v.claim == "dense MLP placement" for v in p.verdicts)
    assert plan(load_spec(TINY_CONFIG), "h100", new_tokens=2).mlp_placement is None  # nothing to place


@pytest.mark.parametrize("change,why", [
    ({"parallel": {"dense_mlp_placement": "output"}}, "must be one of ['attention', 'experts']"),
    ({"model": {"dense_layers": None, "shared_expert_size": 0}}, "nothing to place"),
    ({"model": {"shared_expert_size": 1}}, "gives GPU 1 no column of model.shared_expert_size (1)"),
])
def test_bad_placements_are_refused_in_one_line(change, why):
    with pytest.raises(SpecError) as e:
        EXP.replace(**change)
    assert "parallel.dense_mlp_placement" in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def test_a_model_of_dense_layers_only_plans_with_them_on_the_expert_gpus():
    """No shared expert: the memory estimates that price every layer as MoE (nothing left to place)
    fall back to the attention placement instead of refusing."""
    spec = EXP.replace(model={"shared_expert_size": 0})
    assert spec.all_moe(2).parallel.dense_mlp_placement == "attention"
    assert EXP.all_moe(2).parallel.dense_mlp_placement == "experts"
    p = plan(spec, "h100", new_tokens=2)
    assert p.layers_fit > 0 and len(p.mlp_placement.options) == 2
