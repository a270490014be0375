"""The seeded model of layers against the test's own float64 reference (tests/references.py,
which imports nothing of pyengine): the pipeline on 3 virtual ranks, the single-device baseline
and the product's own output-check reference, over layouts, micro-batch counts and q/k norms."""

import pytest
import torch

import references
from helpers import TINY_CONFIG, on_threads
from pyengine.core.spec import load_spec
from pyengine.execute.engine import Engine
from pyengine.model.forward import single_device
from pyengine.model.reference import reference_forward
from pyengine.model.weights import init_weights, make_tokens
from pyengine.transport.local import LocalTransport

BASE = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6,
    "seq_len": 7, "rope_theta": 500.0})  # 2 sequences of 7 tokens; theta small so RoPE turns far


def expected(spec, w, ids):
    m = spec.model
    return references.decoder_model(w, ids, layers=m.num_layers, heads=m.heads, kv=m.kv_heads,
                                    top_k=m.top_k, eps=m.norm_eps, theta=m.rope_theta,
                                    qk_norm=m.qk_norm).float()


def pipeline(spec, ids):
    transports = LocalTransport.create(3, "cpu", 30)
    out = on_threads(lambda r: Engine(spec, transports[r], seed=3).forward(ids))
    return out[spec.stage("output").gpus[0]].reshape(-1, spec.model.vocab_size)


@pytest.mark.parametrize("qk_norm", ["none", "per_head", "full"])
@pytest.mark.parametrize("m", [1, 3, 5])  # 5 chunks of 14 tokens: 3,3,3,3,2, two cross a sequence end
def test_pipeline_matches_the_float64_reference(qk_norm, m):
    spec = BASE.replace(model={"qk_norm": qk_norm}, schedule={"micro_batches": m})
    w, ids = init_weights(spec, 3), make_tokens(spec, 4)
    want = expected(spec, w, ids)
    assert (pipeline(spec, ids) - want).abs().max() < 1e-4
    assert (single_device(spec, w, ids.reshape(-1)) - want).abs().max() < 1e-4
    assert (reference_forward(spec, w, ids).reshape(want.shape) - want).abs().max() < 1e-4


def test_attention_matters():
    # guards the comparison: the same weights with the attention's outputs zeroed differ
    spec = BASE
    w, ids = init_weights(spec, 3), make_tokens(spec, 4)
    muted = dict(w, **{f"layers.{i}.wo": torch.zeros_like(w[f"layers.{i}.wo"]) for i in range(2)})
    assert (expected(spec, w, ids) - expected(spec, muted, ids)).abs().max() > 1e-2
    assert (pipeline(spec, ids) - expected(spec, muted, ids)).abs().max() > 1e-2


def test_expert_parallel_and_output_elsewhere():
    for stages in ([{"name": "embed", "gpus": [0]},
                    {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert",
                     "expert_ids": [[4], [0, 2], [1, 3]]},
                    {"name": "output", "gpus": [0]}],
                   [{"name": "embed", "gpus": [0]},
                    {"name": "experts", "gpus": [0, 1], "tensor_parallel_size": 2},
                    {"name": "output", "gpus": [2]}]):
        spec = BASE.replace(parallel={"stages": stages}, schedule={"micro_batches": 3, "kind": "asready"})
        w, ids = init_weights(spec, 3), make_tokens(spec, 4)
        assert (pipeline(spec, ids) - expected(spec, w, ids)).abs().max() < 1e-4


def test_the_seeded_model_config_is_the_seeds_shapes():
    spec = load_spec(str(__import__("helpers").packaged_config("seed_model_3gpu.json")))
    m = spec.model
    assert (m.hidden_size, m.ffn_hidden_size, m.num_experts, m.top_k, m.vocab_size) == (4096, 14336, 8, 2, 32000)
    assert (m.heads, m.kv_heads, m.head_size, m.num_layers) == (32, 8, 128, 21)
