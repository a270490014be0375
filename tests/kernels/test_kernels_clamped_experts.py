"""gpt-oss's experts in the fused kernels: the clamped SwiGLU with gate/up biases in the column
kernel's epilogue and the down bias in the row kernel's, chosen once when the ExpertShard is made
(biases with the plain SwiGLU too).
Against the obvious torch loop, fp32 on the interpreter, odd sizes: a whole shard with choices held
elsewhere (EP's -1), and two TP shards of F whose partials (the down bias on the first only) add up
to the whole."""

import pytest
import torch

from pyengine.kernels.moe_expert_shard import ExpertShard
from test_kernels_moe import DEVICE, make_inputs
from test_kernels_skip_ids import with_held_elsewhere

ALPHA, LIMIT = 1.702, 0.8  # a limit low enough that both clamps bite on unit-scale activations


def reference(u, wg, wu, wd, bg, bu, bd, ids, weights):
    y = torch.zeros(u.shape, dtype=torch.float32)
    for t in range(u.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            if e < 0:
                continue
            gate = torch.clamp(u[t] @ wg[e] + bg[e], max=LIMIT)
            up = torch.clamp(u[t] @ wu[e] + bu[e], -LIMIT, LIMIT)
            a = (up + 1) * gate / (1 + torch.exp(-ALPHA * gate))
            y[t] += weights[t, j] * (a @ wd[e] + bd[e])
    return y


def _biases(E, H, F, seed=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(DEVICE) for s in ((E, F), (E, F), (E, H))]


def _shard(E, H, F, k):
    return ExpertShard(E, H, F, k, torch.float32, DEVICE, activation="clamped_swiglu", skip_ids=True, bias=True,
                       alpha=ALPHA, limit=LIMIT)


@pytest.mark.parametrize("T", [1, 9])
def test_whole_shard_with_choices_held_elsewhere(T):
    E, k, H, F = 5, 2, 22, 13
    u, wg, wu, wd, ids, weights = make_inputs(T, E, k, H, F, "random", torch.float32, seed=T)
    ids = with_held_elsewhere(ids, seed=T, share=0.3)
    bg, bu, bd = _biases(E, H, F)
    got = _shard(E, H, F, k)(u, wg, wu, wd, ids, weights, b_gate=bg, b_up=bu, b_down=bd)
    want = reference(u, wg, wu, wd, bg, bu, bd, ids, weights)
    torch.testing.assert_close(got.float().cpu(), want, rtol=1e-5, atol=1e-5)


def test_tp_shards_add_up_with_the_down_bias_once():
    E, k, H, F, T, cut = 5, 2, 22, 13, 7, 6
    u, wg, wu, wd, ids, weights = make_inputs(T, E, k, H, F, "random", torch.float32, seed=4)
    bg, bu, bd = _biases(E, H, F)
    first = _shard(E, H, cut, k)(u, wg[:, :, :cut].contiguous(), wu[:, :, :cut].contiguous(), wd[:, :cut].contiguous(),
                                 ids, weights, b_gate=bg[:, :cut].contiguous(), b_up=bu[:, :cut].contiguous(), b_down=bd)
    second = _shard(E, H, F - cut, k)(u, wg[:, :, cut:].contiguous(), wu[:, :, cut:].contiguous(),
                                      wd[:, cut:].contiguous(), ids, weights, b_gate=bg[:, cut:].contiguous(),
                                      b_up=bu[:, cut:].contiguous(), b_down=torch.zeros_like(bd))
    want = reference(u, wg, wu, wd, bg, bu, bd, ids, weights)
    torch.testing.assert_close((first + second).float().cpu(), want, rtol=1e-5, atol=1e-5)


def test_biases_with_plain_swiglu_and_not_with_gelu():
    E, k, H, F, T = 5, 2, 22, 13, 6
    u, wg, wu, wd, ids, weights = make_inputs(T, E, k, H, F, "random", torch.float32, seed=6)
    bg, bu, bd = _biases(E, H, F)
    got = ExpertShard(E, H, F, k, torch.float32, DEVICE, bias=True)(u, wg, wu, wd, ids, weights, b_gate=bg,
                                                                   b_up=bu, b_down=bd)
    want = torch.zeros(T, H)
    for t in range(T):
        for j in range(k):
            e = int(ids[t, j])
            gate, up = u[t] @ wg[e] + bg[e], u[t] @ wu[e] + bu[e]
            want[t] += weights[t, j] * ((gate * torch.sigmoid(gate) * up) @ wd[e] + bd[e])
    torch.testing.assert_close(got.float().cpu(), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="bias=True"):
        ExpertShard(E, H, F, k, torch.float32, DEVICE, activation="gelu", bias=True)
