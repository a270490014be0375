"""A seeded model with Qwen2-MoE's parts (q/k/v projection biases and no o bias, a shared expert
scaled per token by sigmoid(u @ ws_scale), a dense MLP layer between MoE layers, raw softmax
top-k weights): the pipeline on 3 virtual ranks (TP experts with uneven shards, and EP with experts
on the attention GPU), the single-device baseline and the output check's reference agree; the
reference agrees with the shared expert written inline; the gate and the biases matter; generation
(torch and Triton paths) equals greedy recomputation by the reference."""

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_CONFIG
from pyengine.core.errors import SpecError
from pyengine.core.spec import load_spec
from pyengine.model.dense_mlp import shared_expert
from pyengine.model.reference import reference_forward
from pyengine.model.tensors import LayerWeights, attention_names, shared_expert_names
from pyengine.model.weights import init_weights, make_tokens
from whole_model_checks import check_pipeline_single_device_and_reference_agree, check_generate_equals_recomputing, pipeline

BASE = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 3, "num_attention_heads": 3, "num_key_value_heads": 1, "head_dim": 6,  # q 18 != H 48
    "bias_projections": ["q", "k", "v"], "shared_expert_size": 9, "shared_expert_gate": True,
    "dense_layers": [1], "dense_ffn_size": 11, "renormalize": False, "seq_len": 7, "rope_theta": 500.0})
EP = [{"name": "embed", "gpus": [0]},
      {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[4], [0, 2], [1, 3]]},
      {"name": "output", "gpus": [0]}]
TOL = dict(rtol=1e-4, atol=1e-4)


def test_tensors_follow_the_biased_projections_and_the_gate():
    m = BASE.model
    assert attention_names(m)[-3:] == ("bq", "bk", "bv") and "bo" not in attention_names(m)
    assert shared_expert_names(m) == ("ws_gate", "ws_up", "ws_down", "ws_scale")
    w = init_weights(BASE, 3)
    assert w["layers.0.ws_scale"].shape == (48, 1) and "layers.1.ws_scale" not in w  # layer 1 is dense
    assert "layers.0.bo" not in w and w["layers.2.bk"].shape == (6,)


def test_the_gate_and_the_biases_are_priced():
    """The gate's GEMV (t x H x 1) and its scale pass; the q/k/v biases and the gate in the weight bytes."""
    from pyengine.model.batch import Batch
    from pyengine.model.stages import stages_of

    embed = stages_of(BASE)[0]
    c = Batch.prefill([7], 1).chunks[0]
    k = {x.name: x for x in embed.kernels(7, 0, layer=2, chunk=c)}
    assert k["shared_scale_gemv"].flops == 2 * 7 * 48 * 1 and k["shared_scale_gemv"].hbm_bytes == (7 * 48 + 48 + 7) * 4
    assert k["shared_scale"].hbm_bytes == (2 * 7 * 48 + 7) * 4
    assert "shared_scale_gemv" not in {x.name for x in embed.kernels(7, 0, layer=1, chunk=c)}  # the dense layer
    assert k["qkv_gemm"].hbm_bytes == (7 * 48 + 48 * 30 + 7 * 30 + 30) * 4  # A, B, C and the q/k/v bias (18 + 2 x 6)
    assert k["o_gemm"].hbm_bytes == (7 * 18 + 18 * 48 + 7 * 48) * 4  # no o bias
    w = embed.weight_bytes(0)
    assert w["ws_scale"] == 2 * 48 * 4 and w["bq"] == 3 * 18 * 4 and w["bk"] == w["bv"] == 3 * 6 * 4 and "bo" not in w


def test_gated_shared_expert_is_the_inline_formula():
    """sigmoid(u . g) * down(silu(u gate) * (u up)), one token at a time, float64."""
    w = LayerWeights(init_weights(BASE, 3), 0)
    u = torch.randn(5, 48, generator=torch.Generator().manual_seed(1))
    want = torch.stack([torch.sigmoid(r.double() @ w["ws_scale"].double())
                        * ((F.silu(r.double() @ w["ws_gate"].double()) * (r.double() @ w["ws_up"].double()))
                           @ w["ws_down"].double()) for r in u])
    torch.testing.assert_close(shared_expert(BASE.model, u, w).double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stages,m", [(None, 3), (EP, 2)])  # TP 0.4/0.6 shards; EP with experts on GPU 0
def test_pipeline_single_device_and_reference_agree(stages, m):
    check_pipeline_single_device_and_reference_agree(BASE, stages, m, TOL)


def test_the_gate_and_the_biases_matter():
    w, ids = init_weights(BASE, 3), make_tokens(BASE, 4)
    base = reference_forward(BASE, w, ids)
    ungated = BASE.replace(model={"shared_expert_gate": False})
    assert (reference_forward(ungated, w, ids) - base).abs().max() > 1e-2
    assert (pipeline(BASE, ids) - reference_forward(ungated, w, ids).reshape(-1, 101)).abs().max() > 1e-2
    for p in "qkv":
        zeroed = dict(w, **{f"layers.{i}.b{p}": torch.zeros_like(w[f"layers.{i}.b{p}"]) for i in range(3)})
        assert (reference_forward(BASE, zeroed, ids) - base).abs().max() > 1e-3, p


@pytest.mark.parametrize("model,key", [
    ({"bias_projections": ["q", "v"]}, "model.bias_projections"),
    ({"bias_projections": ["q", "k", "v"], "attention_bias": True}, "model.bias_projections"),
    ({"shared_expert_size": 0}, "model.shared_expert_gate"),
])
def test_bad_bias_and_gate_fields_are_refused(model, key):
    with pytest.raises(SpecError, match=key.replace(".", r"\.")):
        BASE.replace(model=model)


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_generate_equals_recomputing(path, monkeypatch):
    """Prompts of different lengths; the decode steps run the static decode step (Triton: the fused
    QKV GEMM with its q/k/v bias, the fused norm + RoPE + cache write, flash-decoding)."""
    monkeypatch.setenv("PYENGINE_KERNELS", path)
    spec = BASE.replace(model={"batch_size": 2, "seq_len": 9})
    check_generate_equals_recomputing(spec, 4, TOL)
