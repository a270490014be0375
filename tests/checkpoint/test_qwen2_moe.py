"""Qwen2-MoE's config.json (pyengine.model.families.qwen2_moe): what it fixes of the spec (q/k/v
biases without an o bias, the gated shared expert, dense layers by mlp_only_layers /
decoder_sparse_step, raw top-k weights), what it refuses in one line naming the key (exit 2 in the
CLI before any rank starts), and Qwen1.5-MoE-A2.7B's shipped config planned whole."""

from __future__ import annotations

import json
from importlib import resources

import pytest

from pyengine.cli.main import main
from pyengine.core.errors import InputError
from pyengine.model.hf_config import deployment_spec, from_dict, read_hf_config

HF = resources.files("pyengine").joinpath("configs", "hf")


def qwen2(**over):
    cfg = {"model_type": "qwen2_moe", "hidden_size": 8, "intermediate_size": 10, "moe_intermediate_size": 6,
           "shared_expert_intermediate_size": 7, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 11,
           "num_hidden_layers": 4, "num_attention_heads": 2, "num_key_value_heads": 1}
    cfg.update(over)
    return {k: v for k, v in cfg.items() if v is not None}


def test_fields_and_defaults():
    hf = from_dict(qwen2(), "x/config.json")
    assert (hf.ffn_hidden_size, hf.shared_expert_size, hf.shared_expert_gate) == (6, 7, True)
    assert hf.biased == ("q", "k", "v") and not hf.renormalize and hf.norm_eps == 1e-6
    assert hf.dense_layers == () and hf.dense_ffn_size == 0
    m = deployment_spec(hf, whole=True).model
    assert m.biased == ("q", "k", "v") and m.shared_expert_gate and m.shared_expert_size == 7


@pytest.mark.parametrize("over,dense", [
    ({"mlp_only_layers": [0, 2]}, (0, 2)),
    ({"decoder_sparse_step": 2}, (0, 2)),  # MoE where (l + 1) % step == 0: layers 1 and 3
    ({"decoder_sparse_step": 2, "mlp_only_layers": [1]}, (0, 1, 2)),
])
def test_dense_layers(over, dense):
    hf = from_dict(qwen2(**over), "x/config.json")
    assert hf.dense_layers == dense and hf.dense_ffn_size == 10
    assert deployment_spec(hf, whole=True).model.dense_layers == dense


def test_qkv_bias_off_means_no_bias():
    hf = from_dict(qwen2(qkv_bias=False), "x/config.json")
    assert hf.biased == () and deployment_spec(hf, whole=True).model.biased == ()


@pytest.mark.parametrize("over,words", [
    ({"use_sliding_window": True, "sliding_window": 4}, "use_sliding_window = True: sliding-window attention"),
    ({"layer_types": ["full_attention", "sliding_attention"] * 2}, "layer_types"),
    ({"qkv_bias": "yes"}, "qkv_bias = 'yes': must be true or false"),
    ({"attention_bias": True}, "attention_bias = True: is not a qwen2_moe key"),
    ({"shared_expert_intermediate_size": None}, "shared_expert_intermediate_size = None: is required"),
    ({"mlp_only_layers": [3]}, "mlp_only_layers = [3]: makes the last layer (3) dense"),
    ({"decoder_sparse_step": 3}, "decoder_sparse_step = 3: makes the last layer (3) dense"),
    ({"mlp_only_layers": [7]}, "must be a list of layer indices in [0, 4)"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, None),  # refused for the whole model (check_whole)
])
def test_refusals_name_the_key(over, words):
    with pytest.raises(InputError) as e:
        from_dict(qwen2(**over), "x/config.json").check_whole()
    assert (words or next(iter(over))) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_cli_refuses_a_sliding_window_checkpoint_in_one_line(checkpoint, tmp_path, capsys, monkeypatch):
    import shutil

    import pyengine.execute.launch as launch

    monkeypatch.setattr(launch, "run_ranks", lambda *a, **k: pytest.fail("a rank started"))
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint("qwen2_moe")[0], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, use_sliding_window=True, sliding_window=4)))
    capsys.readouterr()
    for cmd in (["run", "--weights", str(folder)], ["generate", "--weights", str(folder), "--max-new-tokens", "2"]):
        assert main(cmd) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "use_sliding_window = True" in err[0], err


def test_qwen1_5_moe_a2_7b_shipped_config_plans_whole(capsys):
    hf = read_hf_config(str(HF.joinpath("qwen1.5-moe-a2.7b")))
    assert (hf.shared_expert_size, hf.shared_expert_gate, hf.biased) == (5632, True, ("q", "k", "v"))
    assert (hf.num_attention_heads, hf.num_key_value_heads, hf.head_dim, hf.rope_theta) == (16, 16, 128, 1e6)
    assert main(["plan", "--hf-config", str(HF.joinpath("qwen1.5-moe-a2.7b"))]) == 0
    out = capsys.readouterr().out
    assert "qwen2_moe" in out and "Verdicts" in out


def test_a_layer_alone_is_refused_its_moe_block_has_a_shared_expert(checkpoint):
    from pyengine.model.checkpoint import open_checkpoint

    folder = checkpoint("qwen2_moe")[0]
    with pytest.raises(InputError, match="shared experts beside the routed ones: run the whole model"):
        open_checkpoint(folder, 2)
    assert open_checkpoint(folder).hf.dense_layers == (1,)


def test_a_spec_that_disagrees_on_the_biases_names_the_key():
    from pyengine.core.errors import SpecError
    from helpers import TINY_CONFIG

    cfg = json.loads(open(TINY_CONFIG).read())
    cfg["model"] = {"batch_size": 1, "seq_len": 4, "bias_projections": ["o"]}
    with pytest.raises(SpecError, match=r"model\.bias_projections = \['o'\]: disagrees with the checkpoint .*qkv_bias"):
        deployment_spec(from_dict(qwen2(), "x/config.json"), cfg, whole=True)
