"""The fused expert kernels at decode shapes (1, 2, 7 tokens), with the decode tiles.

CPU: the Triton interpreter in fp32 at tiny odd H / F_r. The tile is the one
decode_configs picks for the shape (pinned through the env, since the CPU otherwise takes
its 16-wide test tile), once for a GPU with many SMs (narrow tiles) and once with one SM
(widest tiles, wider than F_r). The reference is written out here, token by token, so it
shares nothing with the code under test.
"""

import math

import pytest
import torch

from pyengine.kernels import decode_configs, tuning

from pyengine.kernels.moe_expert_shard import moe_expert_shard

E, K_TOP, H, F = 5, 2, 40, 29  # H, F_r not multiples of 16: ragged tiles everywhere


def _tie_free_routing(T, g):
    """Router logits spaced by a whole unit (no two equal), so top-k has one answer."""
    logits = torch.stack([torch.randperm(E, generator=g).float() for _ in range(T)])
    weights, ids = torch.softmax(logits, dim=1).topk(K_TOP, dim=1)
    return ids.to(torch.int32), weights / weights.sum(dim=1, keepdim=True)


def _reference(u, w_gate, w_up, w_down, ids, weights):
    """y[t] = sum_j w[t, j] * (silu(u[t] Wg[e]) * (u[t] Wu[e])) Wd[e], e = ids[t, j]."""
    y = torch.zeros(u.shape[0], u.shape[1], dtype=torch.float64)
    for t in range(u.shape[0]):
        x = u[t].double()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate = x @ w_gate[e].double()
            act = gate / (1 + torch.exp(-gate)) * (x @ w_up[e].double())
            y[t] += float(weights[t, j]) * (act @ w_down[e].double())
    return y


def _pin(monkeypatch, T, sms):
    for op, var in tuning.ENV_PIN.items():
        N, K = (F, H) if op == "column" else (H, F)
        cfg = decode_configs.decode_config(op, num_tokens=T, top_k=K_TOP, E=E, N=N, K=K,
                                           dtype=torch.float32, sms=sms)
        text = ",".join(f"{k}={v}" for k, v in tuning.config_to_dict(cfg).items())
        monkeypatch.setenv(var, text.replace("num_warps=4", "num_warps=1"))  # interpreter: any
    return cfg


@pytest.mark.parametrize("sms", [132, 1], ids=["many SMs", "one SM"])
@pytest.mark.parametrize("T", [1, 2, 7])
def test_decode_shapes_match_reference(T, sms, monkeypatch):
    row_cfg = _pin(monkeypatch, T, sms)
    assert row_cfg.kwargs["BLOCK_M"] == 16
    g = torch.Generator().manual_seed(T)
    u = torch.randn(T, H, generator=g)
    w_gate = torch.randn(E, H, F, generator=g) / math.sqrt(H)
    w_up = torch.randn(E, H, F, generator=g) / math.sqrt(H)
    w_down = torch.randn(E, F, H, generator=g) / math.sqrt(F)
    ids, weights = _tie_free_routing(T, g)
    out = moe_expert_shard(u, w_gate, w_up, w_down, ids, weights)
    ref = _reference(u, w_gate, w_up, w_down, ids, weights)
    assert out.shape == (T, H)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
