"""A seeded model with gpt-oss's parts (attention sinks, sliding and full layers with a window shorter
than the sequence, biases on every projection, a router with a bias, biased experts with the clamped
SwiGLU, its limit low enough to bite): the pipeline on 3 virtual ranks (TP with uneven shards, and EP
with experts on the attention GPU), the single-device baseline and the output check's reference
agree; each part matters; generation (torch and Triton decode) equals recomputing by the reference."""

import pytest
import torch

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.model.reference import reference_forward
from pyengine.model.weights import init_weights, make_tokens
from whole_model_checks import check_generate_equals_recomputing, check_pipeline_single_device_and_reference_agree

BASE = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "attention_bias": True,
    "attention_sinks": True, "sliding_window": 3, "layer_types": ["sliding", "full", "sliding"],
    "router_bias": True, "expert_bias": True, "clamped_swiglu": {"alpha": 1.702, "limit": 0.9},
    "ffn_hidden_size": 13, "seq_len": 7, "rope_theta": 500.0})
EP = [{"name": "embed", "gpus": [0]},
      {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[4], [0, 2], [1, 3]]},
      {"name": "output", "gpus": [0]}]


@pytest.mark.parametrize("stages,m", [(None, 3), (EP, 2)])  # TP 0.4/0.6 shards; EP with experts on GPU 0
def test_pipeline_single_device_and_reference_agree(stages, m):
    check_pipeline_single_device_and_reference_agree(BASE, stages, m, dict(rtol=1e-5, atol=1e-5))


def test_every_part_matters():
    w, ids = init_weights(BASE, 3), make_tokens(BASE, 4)
    base = reference_forward(BASE, w, ids)
    changed = {
        "sinks": {f"layers.{i}.sinks": w[f"layers.{i}.sinks"] + 2 for i in range(3)},
        "router_bias": {f"layers.{i}.router_bias": torch.tensor([3.0, 0, 0, 0, 0]) for i in range(3)},
        "b_down": {f"layers.{i}.b_down": w[f"layers.{i}.b_down"] * 3 for i in range(3)},
        "b_gate": {f"layers.{i}.b_gate": w[f"layers.{i}.b_gate"] * 5 for i in range(3)},
    }
    for name, new in changed.items():
        assert (reference_forward(BASE, dict(w, **new), ids) - base).abs().max() > 1e-2, name
    for model in ({"layer_types": ["full"] * 3}, {"clamped_swiglu": {"alpha": 1.702, "limit": 7.0}}):
        assert (reference_forward(BASE.replace(model=model), w, ids) - base).abs().max() > 1e-2, model


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_generate_past_the_window_equals_recomputing(path, monkeypatch):
    """Prompts of 5 and 2 tokens, 5 new: decode steps read past the window of 3 (Triton: the split
    kernel's window and sinks in place)."""
    monkeypatch.setenv("PYENGINE_KERNELS", path)
    spec = BASE.replace(model={"batch_size": 2, "seq_len": 10})
    check_generate_equals_recomputing(spec, 5, dict(rtol=1e-5, atol=1e-5), timeout_s=300)


@pytest.mark.parametrize("model,field", [
    ({"layer_types": ["sliding", "full"]}, "model.layer_types"),
    ({"layer_types": ["sliding", "full", "local"]}, "model.layer_types[2]"),
    ({"sliding_window": 0}, "model.sliding_window"),
    ({"sliding_window": None}, "model.layer_types"),
    ({"clamped_swiglu": {"alpha": 0.0, "limit": 7.0}}, "model.clamped_swiglu.alpha"),
    ({"rope_scaling": {"factor": 4.0, "original_max_positions": 4, "mscale_all_dim": 1.0}},
     "model.rope_scaling.mscale_all_dim"),
])
def test_bad_values_are_one_spec_error_naming_the_field(model, field):
    from pyengine.core.errors import SpecError

    with pytest.raises(SpecError) as e:
        BASE.replace(model=model)
    assert str(e.value).startswith(field + " ") and "\n" not in str(e.value)


def test_block_without_layers_refuses_attention_variants():
    from pyengine.core.errors import SpecError

    with pytest.raises(SpecError, match=r"^model.attention_sinks .*needs model.num_layers"):
        load_spec(TINY_CONFIG).replace(model={"attention_sinks": True})


def test_a_sliding_layer_reads_and_is_priced_for_its_window_only():
    """Attention work of a sliding layer: each query at most `window` keys, the segment's keys from
    the first its first query sees; the full layers all of them (priced per layer)."""
    from pyengine.model.batch import Segment
    from pyengine.model.stages import stages_of

    seg = Segment(seq=0, lo=0, hi=4, pos=2)  # queries at positions 2..5 read 3, 4, 5, 6 keys
    assert seg.attended_in(0) == 3 + 4 + 5 + 6 and seg.keys_in(0) == 6
    assert seg.attended_in(3) == 3 * 4 and seg.keys_in(3) == 6 - 0  # first query (2) sees keys 0..2
    assert Segment(seq=0, lo=0, hi=1, pos=9).attended_in(3) == 3 and Segment(seq=0, lo=0, hi=1, pos=9).keys_in(3) == 3
    assert Segment(seq=0, lo=0, hi=2, pos=0).attended_in(5) == 1 + 2
    embed = stages_of(BASE)[0]
    cost = {layer: {k.name: k for k in embed.kernels(14, 0, layer)}["attention"] for layer in (1, 2)}
    # 2 prompts of 7 in chunks of 5, 5, 4: full layer 1 reads 1..7 keys per query (28 pairs a prompt),
    # sliding layer 2 at most 3 (1 + 2 + 3 x 5 = 18); 4 FLOPs x heads 4 x d 6 per pair
    assert (cost[1].flops, cost[2].flops) == (4 * 4 * 6 * 56, 4 * 4 * 6 * 36)
    # key rows read per segment: 5, 7, 3, 7 (full) and 5, 7 - 3, 3, 7 - 1 (sliding); K and V, 2 kv x 6, fp32
    assert cost[1].hbm_bytes - cost[2].hbm_bytes == 2 * (22 - 18) * 12 * 4
