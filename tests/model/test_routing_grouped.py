"""DeepSeek-V3's grouped sigmoid routing (pyengine.model.math.route_grouped, the torch path, and the
Triton path through TritonOps.route) against transformers' DeepseekV3TopkRouter and against a
reference written here one row at a time in Python floats."""

import math

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from pyengine.core.spec_parts import GroupedRoutingSpec
from pyengine.model.math import route_grouped
from pyengine.model.ops_torch import TorchOps
from pyengine.model.ops_triton import TritonOps

CASES = [  # (E, k, n_group, topk_group, renormalize, scaling)
    (16, 4, 4, 2, True, 2.5),  # several groups, two kept
    (12, 3, 3, 1, False, 1.0),  # one group kept: the top-k inside it; raw sigmoid weights
    (10, 2, 1, 1, True, 1.5),  # no grouping
]


def reference(logits, bias, k, n_group, topk_group, renormalize, scaling):
    ids, weights = [], []
    for row, b in zip(logits.double().tolist(), [bias.double().tolist()] * logits.shape[0]):
        s = [1 / (1 + math.exp(-x)) for x in row]
        c = [si + bi for si, bi in zip(s, b)]
        size = len(row) // n_group
        score = [sum(sorted(c[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: (-score[g], g))[:topk_group]
        allowed = [e for e in range(len(row)) if e // size in groups]
        chosen = sorted(allowed, key=lambda e: (-c[e], e))[:k]
        w = [s[e] for e in chosen]
        total = sum(w) + 1e-20 if renormalize else 1.0
        ids.append(chosen)
        weights.append([x / total * scaling for x in w])
    return torch.tensor(ids), torch.tensor(weights, dtype=torch.float64)


def draw(e, t=9, h=14, seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(t, h, generator=g)
    router = torch.randn(h, e, generator=g) / 2
    bias = torch.randn(e, generator=g) * 0.3  # large enough to change choices
    return u, router, bias


@pytest.mark.parametrize("e,k,n_group,topk_group,renorm,scaling", CASES)
def test_equals_the_written_out_rule_on_both_paths(e, k, n_group, topk_group, renorm, scaling):
    u, router, bias = draw(e)
    spec = GroupedRoutingSpec(n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling)
    want_ids, want_w = reference(u @ router, bias, k, n_group, topk_group, renorm, scaling)
    for ops in (TorchOps(), TritonOps(None, torch.device("cpu"))):
        ids, w = ops.route(u, router, k, renorm, spec, bias)
        assert ids.dtype == torch.int32 and w.dtype == torch.float32
        assert torch.equal(ids.long(), want_ids), type(ops).__name__
        torch.testing.assert_close(w.double(), want_w, rtol=1e-6, atol=1e-7)


def test_the_bias_steers_the_choice_but_never_a_weight():
    u, router, bias = draw(8)
    spec = GroupedRoutingSpec(n_group=1, topk_group=1, routed_scaling_factor=1.0)
    big = torch.zeros(8)
    big[5] = 10.0  # expert 5 always chosen, its weight still its own sigmoid
    ids, w = route_grouped(u, router, 2, False, spec, big)
    assert (ids[:, 0] == 5).all()
    torch.testing.assert_close(w[:, 0], torch.sigmoid(u @ router)[:, 5])


@pytest.mark.parametrize("e,k,n_group,topk_group,renorm,scaling", CASES[:2])
def test_equals_transformers_router(e, k, n_group, topk_group, renorm, scaling):
    h = 14
    cfg = DeepseekV3Config(hidden_size=h, n_routed_experts=e, num_experts_per_tok=k, n_group=n_group,
                           topk_group=topk_group, norm_topk_prob=renorm, routed_scaling_factor=scaling)
    hf = DeepseekV3TopkRouter(cfg)
    u, router, bias = draw(e, h=h, seed=1)
    with torch.no_grad():
        hf.weight.copy_(router.T)
        hf.e_score_correction_bias.copy_(bias)
        _, hf_w, hf_ids = hf(u)
    ids, w = route_grouped(u, router, k, renorm, GroupedRoutingSpec(
        n_group=n_group, topk_group=topk_group, routed_scaling_factor=scaling), bias)
    order = hf_ids.argsort(-1)  # transformers' top-k is unsorted: compare by expert id
    mine = ids.long().argsort(-1)
    assert torch.equal(ids.long().gather(1, mine), hf_ids.gather(1, order))
    torch.testing.assert_close(w.gather(1, mine), hf_w.gather(1, order), rtol=1e-6, atol=1e-7)
