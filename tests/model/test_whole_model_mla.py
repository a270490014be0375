"""A seeded model with DeepSeek-V3's attention, router and shared expert (MLA with a low-rank q, YaRN,
grouped sigmoid routing with a correction bias, a shared expert on the attention GPU): the pipeline on 3 virtual ranks (TP experts with uneven
shards, and EP), the single-device baseline and the output check's reference agree; the attention
and the correction bias matter."""

from dataclasses import asdict

import pytest
import torch

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.core.spec_parts import YarnSpec
from pyengine.model.reference import reference_forward
from pyengine.model.weights import init_weights, make_tokens
from whole_model_checks import check_pipeline_single_device_and_reference_agree, check_generate_equals_recomputing, pipeline

MLA = {"q_lora_rank": 10, "kv_lora_rank": 12, "qk_nope_head_dim": 6, "qk_rope_head_dim": 8, "v_head_dim": 5}
YARN = asdict(YarnSpec(factor=4.0, original_max_positions=4, mscale=1.0, mscale_all_dim=0.8))
BASE = load_spec(TINY_CONFIG).replace(model={
    "num_attention_heads": 3, "mla": MLA, "rope_scaling": YARN, "num_experts": 6,
    "grouped_routing": {"n_group": 3, "topk_group": 2, "routed_scaling_factor": 1.7}, "shared_expert_size": 9,
    "num_layers": 3, "dense_layers": [0], "dense_ffn_size": 11,
    "seq_len": 7, "rope_theta": 500.0})
EP = [{"name": "embed", "gpus": [0]},
      {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[4], [0, 2, 5], [1, 3]]},
      {"name": "output", "gpus": [0]}]


@pytest.mark.parametrize("stages,m", [(None, 3), (EP, 2)])  # TP 0.4/0.6 shards; EP with experts on GPU 0
def test_pipeline_single_device_and_reference_agree(stages, m):
    check_pipeline_single_device_and_reference_agree(BASE, stages, m, dict(rtol=1e-4, atol=1e-4))


def test_attention_and_the_correction_bias_matter():
    spec = BASE
    w, ids = init_weights(spec, 3), make_tokens(spec, 4)
    base = reference_forward(spec, w, ids)
    muted = dict(w, **{f"layers.{i}.wo": torch.zeros_like(w[f"layers.{i}.wo"]) for i in (1, 2)})
    assert (reference_forward(spec, muted, ids) - base).abs().max() > 1e-2
    steered = dict(w, **{f"layers.{i}.router_correction": torch.tensor([5.0, 0, 0, 0, 0, 0]) for i in (1, 2)})
    assert (reference_forward(spec, steered, ids) - base).abs().max() > 1e-2
    unshared = dict(w, **{f"layers.{i}.ws_down": torch.zeros_like(w[f"layers.{i}.ws_down"]) for i in (1, 2)})
    assert (reference_forward(spec, unshared, ids) - base).abs().max() > 1e-2
    assert (pipeline(spec, ids) - reference_forward(spec, unshared, ids).reshape(-1, 101)).abs().max() > 1e-2
    no_dense = dict(w, **{"layers.0.wd_down": torch.zeros_like(w["layers.0.wd_down"])})
    assert (reference_forward(spec, no_dense, ids) - base).abs().max() > 1e-2
    assert "layers.0.router" not in w and "layers.0.w_up" not in w  # a dense layer has no router, no experts


PLACED = {"attention": {}, "experts-tp": {"dense_mlp_placement": "experts"},
          "experts-ep": {"dense_mlp_placement": "experts", "stages": EP}}
"""parallel.dense_mlp_placement cases: the shared expert and the dense layer on the attention GPU, or
split over the expert GPUs (TP 0.4/0.6; EP over GPUs 0, 1, 2)."""


@pytest.mark.parametrize("placed", list(PLACED))
@pytest.mark.parametrize("path", ["torch", "triton"])
def test_generate_with_the_latent_cache_equals_recomputing(path, placed, monkeypatch):
    """Prompts of different lengths; decode steps read the latent cache (Triton: in place, absorbed);
    the static decode step runs the shared expert and the dense MLP wherever they are placed."""
    monkeypatch.setenv("PYENGINE_KERNELS", path)
    spec = BASE.replace(model={"batch_size": 2, "seq_len": 9}, parallel=PLACED[placed])
    check_generate_equals_recomputing(spec, 4, dict(rtol=1e-4, atol=1e-4))
