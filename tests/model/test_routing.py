"""Top-k routing with and without renormalisation (norm_topk_prob), in the stage math and in the
independent reference, against closed forms."""

import pytest
import torch

from pyengine.core.spec import load_spec
from pyengine.model.forward import single_device
from pyengine.model.math import route
from pyengine.model.reference import reference_forward
from pyengine.model.weights import init_weights, make_tokens


def test_route_closed_form():
    u = torch.eye(3)
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.2, 0.7], [0.3, 0.6, 0.1]])
    ids, w = route(u, torch.log(probs), 2, renormalize=False)  # softmax of log p is p
    assert ids.tolist() == [[0, 1], [2, 1], [1, 0]]
    assert torch.allclose(w, torch.tensor([[0.5, 0.3], [0.7, 0.2], [0.6, 0.3]]))  # the raw probabilities
    ids2, w = route(u, torch.log(probs), 2)
    assert torch.equal(ids2, ids)
    assert torch.allclose(w, torch.tensor([[5 / 8, 3 / 8], [7 / 9, 2 / 9], [6 / 9, 3 / 9]]))  # sum to 1


@pytest.mark.parametrize("renormalize", [True, False])
def test_reference_and_stage_code_agree(tiny_spec, renormalize):
    spec = tiny_spec.replace(model={"renormalize": renormalize})
    w, ids = init_weights(spec, 2), make_tokens(spec, 2)
    ref = reference_forward(spec, w, ids).reshape(-1, spec.model.vocab_size)
    assert torch.allclose(single_device(spec, w, ids.reshape(-1)), ref, atol=1e-5, rtol=1e-5)


def test_renormalize_changes_the_output(tiny_spec):
    w, ids = init_weights(tiny_spec, 2), make_tokens(tiny_spec, 2)
    off = tiny_spec.replace(model={"renormalize": False})
    assert (reference_forward(tiny_spec, w, ids) - reference_forward(off, w, ids)).abs().max() > 1e-2
    assert load_spec(None).model.renormalize is True  # the default keeps the seed's behaviour


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_route_softmax_runs_in_fp32_for_half_inputs(dtype):
    g = torch.Generator().manual_seed(4)
    u = torch.randn(64, 32, generator=g).to(dtype)
    router = (torch.randn(32, 16, generator=g) * 0.3).to(dtype)
    ids, w = route(u, router, 4, renormalize=False)
    exact = torch.softmax((u @ router).float(), dim=-1).gather(-1, ids.long())
    half = torch.softmax(u @ router, dim=-1).float().gather(-1, ids.long())  # the bug it must not have
    assert w.dtype == torch.float32
    assert (w - exact).abs().max() < 1e-6
    assert (half - exact).abs().max() > 1e-5  # a softmax in the input dtype would be caught above
