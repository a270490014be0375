"""The block against a well-known implementation: transformers' Mixtral modules
(MixtralRMSNorm, the top-k router and MixtralSparseMoeBlock), weights copied in
(tests/hf_mixtral.py)."""

import pytest
import torch

import references as ref
from hf_mixtral import hf_forward, hf_moe, hf_norm
from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.model import reference as product_reference
from pyengine.model.forward import single_device
from pyengine.model.math import rmsnorm, route
from pyengine.model.weights import init_weights, make_tokens

pytest.importorskip("transformers")

FP32 = dict(atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,H,eps", [
    (5, 48, 1e-5),  # the tiny config's H
    (3, 7, 0.25),  # odd H, large eps
])
def test_rmsnorm_matches_transformers(T, H, eps):
    g = torch.Generator().manual_seed(H)
    x, gain = torch.randn(T, H, generator=g), 1 + 0.1 * torch.randn(H, generator=g)
    with torch.no_grad():
        want = hf_norm(gain, eps)(x)
    torch.testing.assert_close(rmsnorm(x, gain, eps), want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ref.rmsnorm(x, gain, eps), want.double(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("T,H,E,k", [
    (26, 24, 5, 2),  # the pipeline tests' shape
    (7, 16, 8, 3),  # k = 3 of 8
])
def test_route_matches_transformers_router(T, H, E, k):
    g = torch.Generator().manual_seed(E * 10 + k)
    u, router = torch.randn(T, H, generator=g), torch.randn(H, E, generator=g) / H**0.5
    block = hf_moe({"router": router, "w_gate": torch.zeros(E, H, 1), "w_up": torch.zeros(E, H, 1),
                    "w_down": torch.zeros(E, 1, H)}, k, 1e-5)
    with torch.no_grad():
        out = block.gate(u)
    # (logits, weights, ids) in transformers >= 5; the router is a bare Linear before that
    want_w, want_ids = (out[1], out[2]) if isinstance(out, tuple) else torch.softmax(out.float(), -1).topk(k, -1)
    want_w = want_w / want_w.sum(-1, keepdim=True)
    ids, w = route(u, router, k)
    assert ids.tolist() == want_ids.tolist()
    torch.testing.assert_close(w, want_w.float(), atol=1e-6, rtol=1e-6)


def _specs():
    tiny = load_spec(TINY_CONFIG)  # T=48, H=48, F=40, E=5, k=2, V=101, fp32
    return {"tiny": tiny,
            "k=3": tiny.replace(model={"top_k": 3}),
            "eps=0.5,k=1": tiny.replace(model={"norm_eps": 0.5, "top_k": 1})}


SPECS = _specs()


@pytest.mark.parametrize("name", SPECS)
def test_block_matches_transformers(name):
    """transformers' block, the test reference, the product reference and the stage code agree."""
    spec = SPECS[name]
    m = spec.model
    w = init_weights(spec, seed=2)
    ids = make_tokens(spec, seed=2)
    want = hf_forward(w, ids, m.top_k, m.norm_eps)
    torch.testing.assert_close(ref.moe_block(w, ids, m.top_k, m.norm_eps), want.double(), **FP32)
    torch.testing.assert_close(product_reference.reference_forward(spec, w, ids).reshape(want.shape),
                               want, **FP32)
    torch.testing.assert_close(single_device(spec, w, ids.reshape(-1)), want, **FP32)
