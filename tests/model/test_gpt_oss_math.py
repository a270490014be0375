"""gpt-oss's sink attention and clamped SwiGLU, the engine's own pieces (attention._attend with sinks
and a window mask, expert_act.ExpertActivation over the de-interleaved gate/up), against
transformers' gpt_oss modules."""

import types

import torch

from pyengine.model.attention import _attend
from pyengine.model.expert_act import ExpertActivation


def test_sink_attention_matches_transformers_eager():
    from transformers.models.gpt_oss.modeling_gpt_oss import eager_attention_forward
    torch.manual_seed(0)
    hq, hkv, t, d, window = 4, 2, 7, 5, 3
    q, k, v = torch.randn(hq, t, d), torch.randn(hkv, t, d), torch.randn(hkv, t, d)
    sinks = torch.randn(hq)
    i, j = torch.arange(t).unsqueeze(1), torch.arange(t).unsqueeze(0)
    for win in (None, window):
        ok = (j <= i) & ((j > i - win) if win else True)
        mask = torch.zeros(t, t).masked_fill(~ok, float("-inf"))[None, None]
        module = types.SimpleNamespace(num_key_value_groups=hq // hkv, sinks=sinks, training=False)
        want, _ = eager_attention_forward(module, q[None], k[None], v[None], mask, d ** -0.5)
        got = _attend(q[None], k[None], v[None], ok, sinks)[0]
        torch.testing.assert_close(got.transpose(0, 1), want[0], rtol=1e-5, atol=1e-6)


def test_clamped_swiglu_matches_transformers_experts():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    cfg = GptOssConfig(hidden_size=8, intermediate_size=6, num_local_experts=2)
    experts = GptOssExperts(cfg)
    x = torch.randn(9, 12) * 6  # large enough that both clamps bite; gate the even, up the odd columns
    act = ExpertActivation(cfg.swiglu_alpha, cfg.swiglu_limit)
    torch.testing.assert_close(act(x[..., 0::2], x[..., 1::2]), experts._apply_gate(x), rtol=0, atol=0)
