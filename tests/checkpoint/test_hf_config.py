"""config.json -> family -> spec, and `pyengine plan --hf-config` on the shipped example configs."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from helpers import TINY_CONFIG
from pyengine.cli.main import main
from pyengine.core.errors import InputError, SpecError
from pyengine.core.spec import load_spec
from pyengine.model.hf_config import deployment_spec, from_dict, read_hf_config

HF = resources.files("pyengine").joinpath("configs", "hf")

# From the model cards (H, F per expert, E, top-k, V, eps, renormalize, layers)
SHIPPED = {
    "mixtral-8x7b": ("mixtral", 4096, 14336, 8, 2, 32000, 1e-5, True, 32),
    "mixtral-8x22b": ("mixtral", 6144, 16384, 8, 2, 32000, 1e-5, True, 56),
    "qwen3-30b-a3b": ("qwen3_moe", 2048, 768, 128, 8, 151936, 1e-6, True, 48),
    "olmoe-1b-7b": ("olmoe", 2048, 1024, 64, 8, 50304, 1e-5, False, 16),
    "moonlight-16b-a3b": ("deepseek_v3", 2048, 1408, 64, 6, 163840, 1e-5, True, 27),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", 2048, 1408, 60, 4, 151936, 1e-6, False, 24),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_configs(name):
    hf = read_hf_config(str(HF.joinpath(name)))
    got = (hf.family, hf.hidden_size, hf.ffn_hidden_size, hf.num_experts, hf.top_k, hf.vocab_size,
           hf.norm_eps, hf.renormalize, hf.num_layers)
    assert got == SHIPPED[name] and hf.dtype == "bfloat16"
    assert hf.dense_layers == ((0,) if hf.family == "deepseek_v3" else ())


def test_moonlight_is_deepseek_v3_with_a_latent_cache():
    hf = read_hf_config(str(HF.joinpath("moonlight-16b-a3b")))
    assert (hf.mla.q_lora_rank, hf.mla.kv_lora_rank, hf.mla.latent_width) == (None, 512, 576)
    assert (hf.shared_expert_size, hf.dense_ffn_size) == (2 * 1408, 11264) and hf.rope_scaling is None
    g = hf.grouped_routing
    assert (g.n_group, g.topk_group, g.routed_scaling_factor) == (1, 1, 2.446)
    spec = deployment_spec(hf, whole=True, batch=(1, 8))
    from pyengine.model.kv_cache import cache_bytes
    # 27 layers x 576 values x 2 bytes per token: 1 sequence of 8 tokens in one 16-row block + the trash block
    assert cache_bytes(spec, 1, 8) == 27 * 2 * 16 * 576 * 2


def test_mixtral_8x7b_is_the_seed_model():
    # the seed's dimensions are exactly Mixtral-8x7B's MoE layer: same spec, field for field
    hf = read_hf_config(str(HF.joinpath("mixtral-8x7b", "config.json")))
    assert deployment_spec(hf) == load_spec(None)


def base(**over):
    cfg = {"model_type": "olmoe", "hidden_size": 8, "intermediate_size": 6, "num_experts": 4,
           "num_experts_per_tok": 2, "vocab_size": 11, "num_hidden_layers": 2}
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


@pytest.mark.parametrize("over,words", [
    ({"model_type": "deepseek_v2"}, "not supported"),
    ({"model_type": "deepseek_v2"}, "not supported"),
    ({"model_type": "llama"}, "not a supported MoE family"),
    ({"model_type": None}, "not a supported MoE family"),
    ({"shared_expert_intermediate_size": 64}, "shared experts are not supported"),
    ({"hidden_act": "gelu"}, "only 'silu'"),
    ({"num_experts": None}, "num_experts = None: is required"),
    ({"hidden_size": True}, "hidden_size = True: must be a positive integer"),
    ({"rms_norm_eps": 0}, "rms_norm_eps = 0: must be a positive number"),
    ({"norm_topk_prob": 1}, "norm_topk_prob = 1: must be true or false"),
    ({"num_local_experts": 5}, "num_local_experts = 5: disagrees with num_experts = 4"),
    ({"dtype": "float64"}, "must be one of"),
    ({"model_type": "qwen3_moe", "moe_intermediate_size": 3, "mlp_only_layers": "0"}, "must be a list"),
])
def test_refusals_name_the_key(over, words):
    with pytest.raises(InputError) as e:
        from_dict(base(**over), "x/config.json")
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("over,refused", [
    ({"model_type": "mixtral", "num_local_experts": 4, "num_experts": None, "sliding_window": 4,
      "use_sliding_window": False}, True),  # transformers' Mixtral applies the window regardless
    ({"model_type": "mixtral", "num_local_experts": 4, "num_experts": None, "sliding_window": None}, False),
    ({"model_type": "qwen3_moe", "moe_intermediate_size": 6, "sliding_window": 4, "use_sliding_window": False}, False),
    ({"model_type": "qwen3_moe", "moe_intermediate_size": 6, "sliding_window": 4, "use_sliding_window": True}, True),
])
def test_a_sliding_window_is_refused_where_the_family_applies_it(over, refused):
    hf = from_dict(base(num_attention_heads=2, **over), "x/config.json")
    if not refused:
        return hf.check_whole()
    with pytest.raises(InputError, match="sliding-window attention is not supported"):
        hf.check_whole()


def deepseek(**over):
    cfg = {"model_type": "deepseek_v3", "hidden_size": 8, "moe_intermediate_size": 6, "n_routed_experts": 8,
           "num_experts_per_tok": 2, "vocab_size": 11, "num_hidden_layers": 2, "num_attention_heads": 2,
           "kv_lora_rank": 4, "q_lora_rank": None, "qk_nope_head_dim": 2, "qk_rope_head_dim": 2, "v_head_dim": 2,
           "n_group": 4, "topk_group": 2, "routed_scaling_factor": 2.5, "first_k_dense_replace": 0,
           "n_shared_experts": 0, "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 16}}
    cfg.update(over)
    return cfg


def test_deepseek_v3_fields():
    hf = from_dict(deepseek(), "x/config.json")
    assert hf.mla.latent_width == 6 and hf.mla.q_lora_rank is None and hf.renormalize is True
    assert (hf.grouped_routing.n_group, hf.grouped_routing.topk_group) == (4, 2) and hf.rope_scaling.factor == 4.0
    assert hf.model_fields(whole=True)["num_key_value_heads"] is None and hf.rope_interleave
    assert from_dict(deepseek(n_shared_experts=2), "c").shared_expert_size == 12  # 2 x moe_intermediate_size
    dense = from_dict(deepseek(first_k_dense_replace=1, intermediate_size=10), "c").model_fields(whole=True)
    assert dense["dense_layers"] == [0] and dense["dense_ffn_size"] == 10
    with pytest.raises(InputError, match="layer = 1: has shared experts"):  # not the routed block --layer runs
        from_dict(deepseek(n_shared_experts=2), "c").check_layer(1)


@pytest.mark.parametrize("over,words", [
    ({"n_shared_experts": -1}, "n_shared_experts = -1: must be a non-negative integer"),
    ({"first_k_dense_replace": 3}, "first_k_dense_replace = 3: must be an integer in [0, 2]"),
    ({"first_k_dense_replace": 1}, "intermediate_size = None: is required"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type = 'linear': only yarn"),
    ({"scoring_func": "softmax"}, "scoring_func = 'softmax': only sigmoid"),
    ({"topk_method": "group_limited_greedy"}, "topk_method = 'group_limited_greedy': only noaux_tc"),
    ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config"),
    ({"num_key_value_heads": 1}, "num_key_value_heads = 1: MLA has no kv heads"),
    ({"n_group": 3}, "n_group = 3: must divide n_routed_experts (8)"),
    ({"topk_group": 5}, "topk_group = 5: must be <= n_group (4)"),
    ({"kv_lora_rank": None}, "kv_lora_rank = None: is required"),
    ({"attention_bias": True}, "attention_bias = True"),
    ({"use_sliding_window": True}, "use_sliding_window = True: is not a deepseek_v3 key the engine knows"),
])
def test_deepseek_v3_refusals_name_the_key(over, words):
    with pytest.raises(InputError) as e:
        hf = from_dict(deepseek(**over), "x/config.json")
        hf.check_whole()
    assert words in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_family_defaults_and_aliases():
    assert from_dict(base(num_experts=None, num_local_experts=4)).num_experts == 4  # transformers' alias
    assert from_dict(base()).dtype == "float32"  # no dtype: transformers' default
    assert from_dict(base(torch_dtype="float16")).dtype == "float16"  # transformers 4.x key
    assert from_dict(base(dtype="bfloat16", torch_dtype="float16")).dtype == "bfloat16"  # 5.x key wins
    mixtral = from_dict(base(model_type="mixtral", num_experts=None, num_local_experts=4, norm_topk_prob=False))
    assert mixtral.renormalize is True and mixtral.norm_eps == 1e-5  # Mixtral always renormalises
    qwen = from_dict(base(model_type="qwen3_moe", moe_intermediate_size=3, num_hidden_layers=6,
                          decoder_sparse_step=2, mlp_only_layers=[3]))
    assert qwen.ffn_hidden_size == 3 and qwen.norm_eps == 1e-6 and not qwen.renormalize
    assert qwen.dense_layers == (0, 2, 3, 4)  # (i + 1) % 2 != 0, or listed
    with pytest.raises(InputError, match="dense MLP layer"):
        qwen.check_layer(2)
    qwen.check_layer(5)


def test_spec_from_config_without_sizes(tmp_path):
    cfg = json.loads(open(TINY_CONFIG).read())
    for key in ("hidden_size", "ffn_hidden_size", "num_experts", "top_k", "vocab_size", "dtype"):
        del cfg["model"][key]
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    hf = from_dict(base())
    spec = deployment_spec(hf, tmp_path / "c.json")
    assert (spec.model.hidden_size, spec.model.ffn_hidden_size, spec.model.num_experts) == (8, 6, 4)
    assert spec.model.renormalize is False and spec.stage("experts").shard_fractions == (0.4, 0.6)
    cfg["model"]["vocab_size"] = 11  # agreeing is fine
    cfg["model"]["renormalize"] = True  # disagreeing is not
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    with pytest.raises(SpecError, match="model.renormalize = True: disagrees with the checkpoint"):
        deployment_spec(hf, tmp_path / "c.json")


def test_plan_hf_config_text(capsys):
    assert main(["plan", "--hf-config", str(HF.joinpath("qwen3-30b-a3b"))]) == 0
    out = capsys.readouterr().out
    assert "model: Qwen/Qwen3-30B-A3B (qwen3_moe" in out and "128 experts, top-8" in out
    assert "Per GPU" in out and "Verdicts" in out


def test_plan_hf_config_prices_moonlight(capsys):
    assert main(["plan", "--hf-config", str(HF.joinpath("moonlight-16b-a3b"))]) == 0
    out = capsys.readouterr().out
    assert "(deepseek_v3" in out and "a cached latent of 576 per token" in out and "Verdicts" in out


def test_plan_hf_config_json(capsys):
    assert main(["plan", "--json", "--hf-config", str(HF.joinpath("olmoe-1b-7b", "config.json"))]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "OLMoE-1B-7B" in data["model_note"]
    assert sum(g["flops"] for g in data["gpus"]) > 0 and all(g["fits"] for g in data["gpus"])


def test_plan_refused_family_is_one_line(tmp_path, capsys):
    (tmp_path / "config.json").write_text(json.dumps(base(model_type="deepseek_v2")))
    assert main(["plan", "--hf-config", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "deepseek_v2" in err[0] and "not supported" in err[0]


def test_every_family_the_engine_reads_has_its_reference_in_the_tests():
    """transformers' own model of a family (built by tests/tiny_hf.py) is the reference of the
    whole-model and generate tests, which run over tiny_hf.FAMILIES: a family added to the engine
    without it would go untested, so it fails here."""
    import tiny_hf
    from pyengine.model.families import FAMILIES

    assert set(FAMILIES) == set(tiny_hf.FAMILIES), set(FAMILIES) ^ set(tiny_hf.FAMILIES)


def test_every_family_module_is_registered():
    """A module under pyengine/model/families is a family only once FAMILIES lists it (and so the
    reference test above covers it); one left out would be read by nothing and tested by nothing."""
    import importlib
    import pkgutil

    import pyengine.model.families as package
    from pyengine.model.families import FAMILIES

    names = [m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "base"]
    unregistered = [n for n in names
                    if getattr(importlib.import_module(f"{package.__name__}.{n}"), "FAMILY", None) not in FAMILIES.values()]
    assert names and not unregistered, unregistered
