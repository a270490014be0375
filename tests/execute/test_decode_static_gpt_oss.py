"""The static decode step of a model with gpt-oss's parts (sinks, a window of 3 shorter than the
sequences, sliding and full layers, biased router and clamped biased experts): the Triton path (the
split kernel's sinks and window, the expert kernels' clamped variant) generates what the torch path
does, TP and EP, and under the CUDA-graph bookkeeping on CPU (no host sync, no input that moves) it
replays what eager computes."""

import pytest

from pyengine.execute.decode_state import DecodeShape
from pyengine.execute.graphs import CheckedReplays
from pyengine.schedule import Kind
from test_decode_static import EP, SPEC, script

GPT_OSS = {"attention_bias": True, "attention_sinks": True, "sliding_window": 3, "layer_types": ["sliding", "full"],
           "router_bias": True, "expert_bias": True, "clamped_swiglu": {"alpha": 1.702, "limit": 0.9}}
SPECS = {"tp": SPEC.replace(model=GPT_OSS), "ep": EP.replace(model=GPT_OSS)}


@pytest.mark.parametrize("name", list(SPECS))
def test_triton_decode_equals_torch_and_replays_under_graphs(name, monkeypatch):
    spec = SPECS[name]
    torch_steps = script(spec)[0][0]
    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    assert script(spec)[0][0] == torch_steps
    per_rank = script(spec, graph_backend=CheckedReplays())
    assert per_rank[0][0] == torch_steps
    for _, _, loop in per_rank:
        rt = loop._decode[DecodeShape(2, 4)][0]
        assert rt.graphs.captured == sum(1 for a in rt.actions if a.kind is Kind.COMPUTE) > 0
