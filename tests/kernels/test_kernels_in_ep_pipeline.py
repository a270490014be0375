"""The expert-parallel pipeline with the Triton kernels in its expert stage (the GPU path: -1 slots
left out by the kernels' alignment, no host sync): on CPU under the interpreter every expert call
goes to moe_expert_shard as on CUDA (on a GPU, the same test runs there, compiled), and the fp32
logits match the plain reference written in tests/execute/test_pipeline_ep.py (its own loop over
tokens and choices)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from execute.test_pipeline_ep import CASES, FP32_ATOL, FP32_RTOL, _expected
from helpers import on_threads
from pyengine.execute.engine import Engine
from pyengine.model.ops_triton import TritonOps
from pyengine.model.weights import make_tokens
from pyengine.transport.local import LocalTransport

PICKED = ("even-split", "uneven-with-gpu0", "top3-asready", "empty-ranks")


@pytest.fixture
def kernels_everywhere(monkeypatch):
    """The Triton path on any device (PYENGINE_KERNELS=triton): the expert stage calls
    moe_expert_shard as on CUDA, skip_ids and all (the ranks' threads take turns in the
    interpreter: TritonOps serialises its launches there)."""
    calls = []
    experts = TritonOps.experts

    def counted(self, w, u, top_ids, top_w, skip_ids=False, static=False, **act):
        calls.append(int(top_ids.shape[0]))
        return experts(self, w, u, top_ids, top_w, skip_ids, static, **act)

    monkeypatch.setenv("PYENGINE_KERNELS", "triton")
    monkeypatch.setattr(TritonOps, "experts", counted)
    return calls


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("name", PICKED)
def test_ep_pipeline_through_the_kernels_matches_the_reference(kernels_everywhere, name, device):
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("CPU tensors need the Triton interpreter (set where CUDA is absent)")
    spec = dict(CASES)[name]
    transports = LocalTransport.create(3, device, 30)
    out = on_threads(lambda r: Engine(spec, transports[r], seed=5).forward(make_tokens(spec, seed=5)),
                     timeout_s=120)
    got = out[spec.stage("output").gpus[0]].cpu().numpy()
    np.testing.assert_allclose(got, _expected(spec), atol=FP32_ATOL, rtol=FP32_RTOL)
    assert kernels_everywhere, "the kernels were never called"
