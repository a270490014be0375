"""The decode step's launch budget, counted on the path a GPU runs (PYENGINE_KERNELS=triton, under the
interpreter here): per layer and decode group, at most 14 kernel launches on the attention rank and 8
on each TP expert rank, and the same counts at 8 and at 64 sequences; the torch path's launches per
step do not grow with the number of sequences either. Counted per compute action (aten ops that
launch a kernel + Triton launches, pyengine.execute.launches)."""

import pytest
import torch

from helpers import TINY_CONFIG, on_threads
from pyengine.core.spec import load_spec
from pyengine.execute.launches import LaunchCounter
from pyengine.execute.step_loop import StepLoop
from pyengine.execute.step_plan import SeqWork, StepPlan
from pyengine.model.stages import StageKind
from pyengine.model.weights import rank_weights
from pyengine.predict.host import GATE_LAUNCHES, LAUNCHES, MLA_LAUNCHES, MLP_LAUNCHES, launches
from pyengine.schedule.actions import ActionId, Kind
from pyengine.transport.local import LocalTransport

SPEC = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    schedule={"micro_batches": 2})
ATTENTION_BUDGET, EXPERT_BUDGET = 14, 8


EP = SPEC.replace(parallel={"stages": [
    {"name": "embed", "gpus": [0]},
    {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[0], [1, 2], [3, 4]]},
    {"name": "output", "gpus": [0]}]})


def decode_launches(sequences: int, spec=SPEC) -> list[dict[str, int]]:
    """Per rank: launches of each compute action of one steady decode step."""
    transports = LocalTransport.create(3, "cpu", 120)

    def rank(r):
        loop = StepLoop(spec, r, transports[r], rank_weights(spec, 1, r, torch.device("cpu")),
                        torch.device("cpu"), slots=sequences, capacity=8)
        loop.run(StepPlan(tuple(SeqWork(s, (s % 90 + 1, 7), 0) for s in range(sequences))))
        step = StepPlan(tuple(SeqWork(s, (3,), 2) for s in range(sequences)))
        loop.run(step)  # warm: the decode shape's runtime and launchers made
        loop.launches = LaunchCounter()
        loop.run(StepPlan(tuple(SeqWork(s, (4,), 3) for s in range(sequences))))
        return dict(loop.launches.by_action)
    return on_threads(rank, timeout_s=900)


def per_layer_part(counts: dict[str, int]) -> dict[str, int]:
    """{action id without the micro-batch: the most launches of any group}."""
    out: dict[str, int] = {}
    for action, n in counts.items():
        key = ".".join(p for p in action.split(".") if not p.startswith("mb"))
        out[key] = max(out.get(key, 0), n)
    return out


@pytest.mark.slow
def test_triton_path_budget_per_layer_and_group_same_at_8_and_64(monkeypatch):
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    few, many = decode_launches(8), decode_launches(64)
    assert few == many  # the same launches whatever the batch
    attention = per_layer_part(few[0])
    layer_parts = {k: n for k, n in attention.items() if ".s0." in k}
    assert len(layer_parts) == SPEC.model.num_layers and max(layer_parts.values()) <= ATTENTION_BUDGET, attention
    for r in (1, 2):  # the TP expert ranks
        experts = per_layer_part(few[r])
        assert experts and max(experts.values()) <= EXPERT_BUDGET, experts
    # the planner's host-time model prices exactly these counts
    assert (attention["l0.s0.COMPUTE"], attention["l1.s0.COMPUTE"], attention["l1.s2.COMPUTE"]) == (
        LAUNCHES[(StageKind.EMBED, "first")], LAUNCHES[(StageKind.EMBED, "later")], LAUNCHES[(StageKind.OUTPUT, "last")])
    assert set(per_layer_part(few[1]).values()) == {LAUNCHES[(StageKind.EXPERTS, "tensor")]}


@pytest.mark.slow
def test_triton_path_expert_parallel_launches_are_what_the_planner_prices(monkeypatch):
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    ranks = decode_launches(8, EP)
    assert set(per_layer_part(ranks[1]).values()) == {LAUNCHES[(StageKind.EXPERTS, "expert")]}, ranks[1]


MLA = SPEC.replace(model={
    "num_key_value_heads": None, "head_dim": None, "num_experts": 6,
    "mla": {"q_lora_rank": 10, "kv_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 8, "v_head_dim": 5},
    "grouped_routing": {"n_group": 3, "topk_group": 2, "routed_scaling_factor": 1.7}})


@pytest.mark.slow
def test_triton_path_mla_launches_are_what_the_planner_prices(monkeypatch):
    """DeepSeek-V3's attention and router: the same counts at 8 and 64 sequences, as priced."""
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    few, many = decode_launches(8, MLA), decode_launches(64, MLA)
    assert few == many
    attention = per_layer_part(few[0])
    assert (attention["l0.s0.COMPUTE"], attention["l1.s0.COMPUTE"]) == (MLA_LAUNCHES["first"], MLA_LAUNCHES["later"])
    # a dense first layer and shared experts (DeepSeek-V3's): the planner's count of each layer part
    spec = MLA.replace(model={"num_layers": 3, "dense_layers": [0], "dense_ffn_size": 11, "shared_expert_size": 9})
    got = per_layer_part(decode_launches(8, spec)[0])
    actions = {k: ActionId(Kind.COMPUTE, StageKind.EMBED, 0, None, (0,), layer)
               for k, layer in (("l0.s0.COMPUTE", 0), ("l1.s0.COMPUTE", 1), ("l2.s0.COMPUTE", 2))}
    assert {k: got[k] for k in actions} == {k: launches(spec, a) for k, a in actions.items()} == {
        "l0.s0.COMPUTE": 21, "l1.s0.COMPUTE": 25, "l2.s0.COMPUTE": 25}


def test_torch_path_launches_per_step_do_not_grow_with_sequences():
    few, many = decode_launches(8), decode_launches(64)
    assert [sum(c.values()) for c in few] == [sum(c.values()) for c in many]


@pytest.mark.slow
def test_triton_path_qwen2_moe_launches_are_what_the_planner_prices(monkeypatch):
    """Qwen2-MoE's parts: q/k/v biases (the fused QKV GEMM adds them: no extra launch), a dense middle
    layer, and a shared expert with its sigmoid gate (GEMV, sigmoid, product: GATE_LAUNCHES more)."""
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    spec = SPEC.replace(model={"num_layers": 3, "bias_projections": ["q", "k", "v"], "dense_layers": [1],
                               "dense_ffn_size": 11, "shared_expert_size": 9, "shared_expert_gate": True})
    got = per_layer_part(decode_launches(8, spec)[0])
    actions = {k: ActionId(Kind.COMPUTE, StageKind.EMBED, 0, None, (0,), layer)
               for k, layer in (("l0.s0.COMPUTE", 0), ("l1.s0.COMPUTE", 1), ("l2.s0.COMPUTE", 2))}
    assert {k: got[k] for k in actions} == {k: launches(spec, a) for k, a in actions.items()}
    gated = LAUNCHES[(StageKind.EMBED, "later")] + MLP_LAUNCHES + GATE_LAUNCHES
    assert launches(spec, actions["l2.s0.COMPUTE"]) == gated


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["tensor", "expert"])
def test_triton_path_mlps_on_the_expert_ranks_are_what_the_planner_prices(monkeypatch, mode):
    """parallel.dense_mlp_placement "experts": the attention rank loses the shared expert's six launches
    (and a dense layer's MLP, sending u with an empty routing instead); each expert rank gains its
    shard's SwiGLU: six launches beside its experts (10 on a TP rank, over the budget of 8 that holds
    for the routed experts alone: the price of moving the GEMMs), five for a dense layer (six in EP)."""
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    spec = MLA.replace(model={"num_layers": 3, "dense_layers": [0], "dense_ffn_size": 11, "shared_expert_size": 9},
                       parallel={"dense_mlp_placement": "experts"})
    if mode == "expert":
        spec = spec.replace(parallel={"stages": [
            {"name": "embed", "gpus": [0]},
            {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[0, 5], [1, 2], [3, 4]]},
            {"name": "output", "gpus": [0]}]})
    ranks = decode_launches(8, spec)
    for r in (1, 2):
        got = per_layer_part(ranks[r])
        want = {k: launches(spec, ActionId(Kind.COMPUTE, StageKind.EXPERTS, 0, None, (0,), layer))
                for k, layer in (("l0.s1.COMPUTE", 0), ("l1.s1.COMPUTE", 1), ("l2.s1.COMPUTE", 2))}
        assert got == want == ({"l0.s1.COMPUTE": 5, "l1.s1.COMPUTE": 10, "l2.s1.COMPUTE": 10} if mode == "tensor" else
                               {"l0.s1.COMPUTE": 6, "l1.s1.COMPUTE": 12, "l2.s1.COMPUTE": 12}), (r, got)
    if mode == "tensor":  # the attention rank: 21 - 6 + 2 at the dense layer, 25 - 6 after
        attention = per_layer_part(ranks[0])
        want = {k: launches(spec, ActionId(Kind.COMPUTE, StageKind.EMBED, 0, None, (0,), layer))
                for k, layer in (("l0.s0.COMPUTE", 0), ("l1.s0.COMPUTE", 1), ("l2.s0.COMPUTE", 2))}
        assert {k: attention[k] for k in want} == want == {"l0.s0.COMPUTE": 17, "l1.s0.COMPUTE": 19, "l2.s0.COMPUTE": 19}
