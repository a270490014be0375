"""YaRN RoPE (pyengine.model.rope_yarn) against transformers' own yarn functions and a closed form:
the frequencies of several widths and correction ranges, the cos/sin factor and the MLA softmax
scale; the config reader refuses every other scaling type in one line."""

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import _compute_yarn_parameters, yarn_apply_mscale

from pyengine.core.errors import InputError
from pyengine.model.attention import RopeTables
from pyengine.model.rope_yarn import cos_sin_factor, inv_freq, read_rope_scaling, softmax_scale

CASES = [  # (rotary width, theta, rope_scaling)
    (8, 1000.0, {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,  # ramp inside
                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}),
    (64, 10000.0, {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,  # V3's
                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    (64, 10000.0, {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,  # V2-Lite's
                   "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    (6, 500.0, {"type": "yarn", "factor": 2.5, "original_max_position_embeddings": 8}),  # no mscale keys
]


def hf_config(dim, theta, scaling):
    return DeepseekV3Config(hidden_size=32, num_attention_heads=2, qk_rope_head_dim=dim, qk_nope_head_dim=4,
                            max_position_embeddings=scaling["original_max_position_embeddings"] * 4,
                            rope_scaling=dict(scaling), rope_theta=theta)


@pytest.mark.parametrize("dim,theta,scaling", CASES)
def test_frequencies_and_scales_equal_transformers(dim, theta, scaling):
    yarn = read_rope_scaling({"rope_scaling": scaling}, "config.json")
    cfg = hf_config(dim, theta, scaling)
    want_inv, want_factor = _compute_yarn_parameters(cfg)
    torch.testing.assert_close(inv_freq(dim, theta, yarn), want_inv, rtol=1e-6, atol=0)
    assert cos_sin_factor(yarn) == pytest.approx(want_factor, rel=1e-12)
    qk = 4 + dim
    assert softmax_scale(qk, yarn) == pytest.approx(yarn_apply_mscale(cfg.rope_parameters, qk ** -0.5), rel=1e-12)


def test_closed_form_of_the_scales():
    yarn = read_rope_scaling({"rope_scaling": CASES[0][2]}, "c")
    m = lambda c: 0.1 * c * math.log(4.0) + 1  # noqa: E731
    assert cos_sin_factor(yarn) == pytest.approx(m(1.0) / m(0.8))
    assert softmax_scale(12, yarn) == pytest.approx(12 ** -0.5 * m(0.8) ** 2)
    assert softmax_scale(12, None) == 12 ** -0.5 and cos_sin_factor(None) == 1.0


def test_extreme_dims_keep_or_divide_the_plain_frequency():
    """Below the correction range the frequency is the plain one, above it divided by factor."""
    dim, theta, scaling = CASES[1]
    yarn = read_rope_scaling({"rope_scaling": scaling}, "c")
    plain = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    got = inv_freq(dim, theta, yarn).double()
    assert torch.allclose(got[:5], plain[:5], rtol=1e-6)  # fast dims: extrapolated (kept)
    assert torch.allclose(got[-5:], plain[-5:] / 40, rtol=1e-6)  # slow dims: interpolated


def test_tables_carry_the_factor():
    dim, theta, scaling = CASES[0]
    yarn = read_rope_scaling({"rope_scaling": scaling}, "c")
    t = RopeTables.make(5, dim, theta, "cpu", yarn)
    ang = torch.arange(5.0)[:, None] * inv_freq(dim, theta, yarn)[None, :]
    torch.testing.assert_close(t.cos_half, ang.cos() * cos_sin_factor(yarn))
    torch.testing.assert_close(t.sin, torch.cat([ang.sin()] * 2, -1) * cos_sin_factor(yarn))


def test_transformers_5_rope_parameters_read_alike():
    params = {"rope_type": "yarn", "rope_theta": 1000.0, **{k: v for k, v in CASES[0][2].items() if k != "type"}}
    assert read_rope_scaling({"rope_parameters": params}, "c") == read_rope_scaling({"rope_scaling": CASES[0][2]}, "c")
    assert read_rope_scaling({"rope_parameters": {"rope_type": "default", "rope_theta": 5.0}}, "c") is None
    assert read_rope_scaling({}, "c") is None


@pytest.mark.parametrize("cfg,key", [
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0}}, "rope_scaling.original_max_position_embeddings"),
    ({"rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 8,
                       "low_freq_factor": 1}}, "rope_scaling.low_freq_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": -2.0, "original_max_position_embeddings": 8}},
     "rope_scaling.factor"),
])
def test_other_scalings_are_refused_in_one_line(cfg, key):
    with pytest.raises(InputError) as e:
        read_rope_scaling(cfg, "config.json")
    assert f"config.json: {key}" in str(e.value) and "\n" not in str(e.value)
