"""gpt-oss's config.json read by its family module: the shipped gpt-oss-20b config, transformers'
defaults for absent keys, and every unsupported key or value refused in one line naming it."""

import pytest

from pyengine.core.errors import InputError
from pyengine.model.hf_config import from_dict, read_hf_config

TINY = {"model_type": "gpt_oss", "hidden_size": 64, "intermediate_size": 32, "num_local_experts": 4,
        "num_experts_per_tok": 2, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "vocab_size": 50, "sliding_window": 8}


def test_the_shipped_gpt_oss_20b_config():
    hf = read_hf_config("pyengine/configs/hf/gpt-oss-20b")
    assert (hf.num_layers, hf.num_experts, hf.top_k, hf.sliding_window, hf.experts_mxfp4) == (24, 32, 4, 128, True)
    assert hf.layer_types == ("sliding", "full") * 12 and hf.attention_sinks and hf.router_bias and hf.expert_bias
    assert hf.rope_scaling.factor == 32.0 and hf.rope_scaling.truncate is False and hf.rope_theta == 150000.0
    assert (hf.clamped_swiglu.alpha, hf.clamped_swiglu.limit) == (1.702, 7.0) and hf.attention_bias


def test_transformers_defaults_for_absent_keys():
    hf = from_dict(TINY)
    assert hf.layer_types == ("sliding", "full", "sliding") and hf.renormalize and not hf.experts_mxfp4
    assert from_dict({**TINY, "sliding_window": None}).layer_types is None


@pytest.mark.parametrize("extra,key", [
    ({"norm_topk_prob": True}, "norm_topk_prob"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention", "chunked_attention"]}, "layer_types"),
    ({"experts_per_token": 3}, "experts_per_token"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config.quant_method"),
    ({"quantization_config": {"quant_method": "mxfp4"}, "intermediate_size": 40}, "intermediate_size"),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                       "mscale_all_dim": 1.0}}, "rope_scaling.mscale_all_dim"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
])
def test_unsupported_keys_and_values_are_one_line_naming_the_key(extra, key):
    with pytest.raises(InputError) as e:
        from_dict({**TINY, **extra})
    assert key in str(e.value).split(" = ")[0] and "\n" not in str(e.value), str(e.value)
