"""The references are independent of what they check, and agree with each other.

- pyengine.model.reference (behind `pyengine run`'s output check) imports nothing of the stage
  code or pyengine.model.math, and tests/references.py imports nothing of pyengine at all: a
  bug in a shared helper cannot cancel out.
- Both references and the stage code (the single-device forward) give the same logits.
- The comparison can fail: a planted routing or normalisation bug moves the logits by far more
  than the tolerance.
"""

import ast
import pathlib

import pytest
import torch

import references as ref
from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.model import reference as product_reference
from pyengine.model.forward import single_device
from pyengine.model.weights import init_weights, make_tokens

TESTS = pathlib.Path(__file__).resolve().parents[1]
FP32 = dict(atol=1e-5, rtol=1e-5)  # fp32 logits ~N(0, 1) vs a float64 reference


def _pyengine_imports(path: pathlib.Path) -> set[str]:
    """Every pyengine module a file imports, at any depth (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add("<relative import>")
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return {m for m in found if m.startswith("pyengine") or m == "<relative import>"}


def test_product_reference_shares_no_code_with_the_stages():
    # Only the spec (a dataclass of sizes) may come from pyengine: no math, no stages, no kernels;
    # its MLA part (with the YaRN formulas GQA reuses) lives beside it and imports nothing of pyengine.
    here = pathlib.Path(product_reference.__file__)
    assert _pyengine_imports(here) == {"pyengine.core.spec.DeploymentSpec",
                                       "pyengine.model.reference_mla.mla_attention",
                                       "pyengine.model.reference_mla.angles", "pyengine.model.reference_mla.rotate"}
    assert _pyengine_imports(here.with_name("reference_mla.py")) == set()


def test_test_references_import_nothing_of_pyengine():
    assert _pyengine_imports(TESTS / "references.py") == set()


def _specs():
    tiny = load_spec(TINY_CONFIG)  # T=48, H=48, F=40, E=5, k=2, V=101
    return {
        "tiny": tiny,
        "k=3,E=4": tiny.replace(model={"num_experts": 4, "top_k": 3}),  # k close to E
        "k=1": tiny.replace(model={"top_k": 1}),  # one expert per token: weight exactly 1
        "eps=0.5": tiny.replace(model={"norm_eps": 0.5}),  # eps large enough that its place shows
    }


SPECS = _specs()


@pytest.mark.parametrize("name", SPECS)
def test_product_reference_and_stage_code_match_the_test_reference(name):
    spec = SPECS[name]
    m = spec.model
    w = init_weights(spec, seed=1)
    ids = make_tokens(spec, seed=1)
    want = ref.moe_block(w, ids, m.top_k, m.norm_eps).reshape(m.batch_size, m.seq_len, m.vocab_size)
    got_ref = product_reference.reference_forward(spec, w, ids)
    torch.testing.assert_close(got_ref.double(), want, **FP32)
    got_stages = single_device(spec, w, ids.reshape(-1)).reshape(want.shape)
    torch.testing.assert_close(got_stages.double(), want, **FP32)


def _unnormalised(logits, k):
    p, i = torch.softmax(logits.double(), -1).topk(k, -1)
    return i.tolist(), p.tolist()


def _over_tokens(logits, k):
    p, i = torch.softmax(logits.double(), 0).topk(k, -1)
    return i.tolist(), (p / p.sum(-1, keepdim=True)).tolist()


def _eps_outside(x, gain, eps):
    x = x.double()
    return x / (x.pow(2).mean(-1, keepdim=True).sqrt() + eps) * gain.double()


@pytest.mark.parametrize("bug", ["drop an expert", "no renormalisation", "eps outside the root",
                                 "softmax over tokens"])
def test_the_comparison_can_fail(bug, monkeypatch):
    """The test reference with a planted bug differs from itself by >> the tolerance, so a
    pipeline with that bug cannot pass the tests that compare against it."""
    spec = SPECS["eps=0.5"]
    m = spec.model
    w = init_weights(spec, seed=1)
    ids = make_tokens(spec, seed=1).reshape(-1)
    good = ref.moe_block(w, ids, m.top_k, m.norm_eps)
    if bug == "drop an expert":
        w = dict(w, w_down=w["w_down"].clone())
        w["w_down"][2] = 0
    elif bug == "no renormalisation":
        monkeypatch.setattr(ref, "softmax_top_k", _unnormalised)
    elif bug == "eps outside the root":
        monkeypatch.setattr(ref, "rmsnorm", _eps_outside)
    else:
        monkeypatch.setattr(ref, "softmax_top_k", _over_tokens)
    bad = ref.moe_block(w, ids, m.top_k, m.norm_eps)
    assert (bad - good).abs().max() > 100 * (FP32["atol"] + FP32["rtol"] * good.abs().max())
