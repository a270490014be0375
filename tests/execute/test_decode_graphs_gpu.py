"""CUDA graphs on a GPU: the graphed decode steps equal the eager ones bitwise (the ids of every step and
the first sequence's logits), TP and EP, at the seeded model's per-layer shapes (2 layers, bf16,
weights drawn on the device), through three bucket shapes; and every compute action of a steady shape
was captured and replayed. The CPU test (test_decode_static.py) checks the same bookkeeping."""

import pytest
import torch

from helpers import on_threads, packaged_config
from pyengine.core.spec import load_spec
from pyengine.execute.graphs import GraphMode
from pyengine.execute.step_loop import StepLoop
from pyengine.execute.step_plan import SeqWork, StepPlan
from pyengine.model.weights import DeviceRandomWeights, rank_weights
from pyengine.schedule import Kind
from pyengine.transport.local import LocalTransport

pytestmark = pytest.mark.gpu
SEED = load_spec(packaged_config("seed_model_3gpu.json")).replace(
    model={"num_layers": 2}, schedule={"micro_batches": 2}, comm={"timeout_s": 120})
EP = SEED.replace(parallel={"stages": [
    {"name": "embed", "gpus": [0]},
    {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1], [2, 3, 4], [5, 6, 7]]},
    {"name": "output", "gpus": [0]}]})
MLA = SEED.replace(model={  # DeepSeek-V3's parts (Moonlight's widths): the MLA decode kernel, grouped routing,
    # a shared expert and a dense first layer under graphs
    "num_layers": 3, "num_key_value_heads": None, "head_dim": None, "dense_layers": [0], "dense_ffn_size": 1024,
    "shared_expert_size": 512, "mla": {"q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
                                       "qk_rope_head_dim": 64, "v_head_dim": 128},
    "grouped_routing": {"n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5}})
LIVE = [list(range(6))] * 4 + [[0, 2, 5]] * 3 + [[2]] * 3  # shapes (2, 4), (2, 2), (1, 1)


def run(spec, mode: GraphMode):
    transports = LocalTransport.create(3, "cuda", 120)
    prompts = [[(7 * s + 3 * i) % 1000 + 1 for i in range(5 + s)] for s in range(6)]

    def rank(r):
        w = rank_weights(spec, DeviceRandomWeights(1), r, torch.device("cuda"))
        loop = StepLoop(spec, r, transports[r], w, torch.device("cuda"), slots=6, capacity=32, graphs=mode)
        seqs = [list(p) for p in prompts]
        out = loop.run(StepPlan(tuple(SeqWork(s, tuple(p), 0) for s, p in enumerate(prompts))))
        ids, logits = [out.ids], []
        for s, i in enumerate(out.ids):
            seqs[s].append(i)
        for live in LIVE:
            out = loop.run(StepPlan(tuple(SeqWork(s, (seqs[s][-1],), len(seqs[s]) - 1) for s in live)),
                           keep_logits=True)
            for s, i in zip(live, out.ids):
                seqs[s].append(i)
            ids.append(out.ids)
            logits.append(out.logits)
        return ids, logits, loop
    return on_threads(rank, timeout_s=600)


@pytest.mark.parametrize("spec", [SEED, EP, MLA], ids=["tp", "ep", "mla"])
def test_graph_replay_equals_eager_bitwise(spec):
    eager = run(spec, GraphMode.OFF)
    graphed = run(spec, GraphMode.ON)
    out_rank = spec.stage("output").gpus[0]
    assert graphed[out_rank][0] == eager[out_rank][0]
    for got, want in zip(graphed[out_rank][1], eager[out_rank][1]):
        assert got is not None and torch.equal(got, want)
    for _, _, loop in graphed:
        assert loop.graphs_on, loop.graphs_reason
        rt = loop._decode[next(iter(loop._decode))][0]  # (2, 4): four steps, captured on the second
        computes = sum(1 for a in rt.actions if a.kind is Kind.COMPUTE)
        assert rt.graphs.captured == computes > 0
