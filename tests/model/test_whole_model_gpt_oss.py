"""A seeded model with gpt-oss's parts (attention sinks, sliding and full layers with a window shorter
than the sequence, biases on every projection, a router with a bias, biased experts with the clamped
SwiGLU, its limit low enough to bite): the pipeline on 3 virtual ranks (TP with uneven shards, and EP
with experts on the attention GPU), the single-device baseline and the output check's reference
agree; each part matters; generation (torch and Triton decode) equals recomputing by the reference."""

import pytest
import torch

from helpers import TINY_CONFIG, on_threads
from pyengine.core.spec import load_spec
from pyengine.execute.engine import Engine
from pyengine.model.forward import single_device
from pyengine.model.reference import reference_forward
from pyengine.model.weights import init_weights, make_tokens
from pyengine.transport.local import LocalTransport

BASE = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6, "attention_bias": True,
    "attention_sinks": True, "sliding_window": 3, "layer_types": ["sliding", "full", "sliding"],
    "router_bias": True, "expert_bias": True, "clamped_swiglu": {"alpha": 1.702, "limit": 0.9},
    "ffn_hidden_size": 13, "seq_len": 7, "rope_theta": 500.0})
EP = [{"name": "embed", "gpus": [0]},
      {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[4], [0, 2], [1, 3]]},
      {"name": "output", "gpus": [0]}]


def pipeline(spec, ids, seed=3):
    transports = LocalTransport.create(3, "cpu", 30)
    out = on_threads(lambda r: Engine(spec, transports[r], seed=seed).forward(ids))
    return out[spec.stage("output").gpus[0]].reshape(-1, spec.model.vocab_size)


@pytest.mark.parametrize("stages,m", [(None, 3), (EP, 2)])  # TP 0.4/0.6 shards; EP with experts on GPU 0
def test_pipeline_single_device_and_reference_agree(stages, m):
    spec = BASE.replace(schedule={"micro_batches": m}, **({"parallel": {"stages": stages}} if stages else {}))
    w, ids = init_weights(spec, 3), make_tokens(spec, 4)
    want = reference_forward(spec, w, ids).reshape(-1, spec.model.vocab_size)
    torch.testing.assert_close(single_device(spec, w, ids.reshape(-1)), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pipeline(spec, ids), want, rtol=1e-5, atol=1e-5)


def test_every_part_matters():
    w, ids = init_weights(BASE, 3), make_tokens(BASE, 4)
    base = reference_forward(BASE, w, ids)
    changed = {
        "sinks": {f"layers.{i}.sinks": w[f"layers.{i}.sinks"] + 2 for i in range(3)},
        "router_bias": {f"layers.{i}.router_bias": torch.tensor([3.0, 0, 0, 0, 0]) for i in range(3)},
        "b_down": {f"layers.{i}.b_down": w[f"layers.{i}.b_down"] * 3 for i in range(3)},
        "b_gate": {f"layers.{i}.b_gate": w[f"layers.{i}.b_gate"] * 5 for i in range(3)},
    }
    for name, new in changed.items():
        assert (reference_forward(BASE, dict(w, **new), ids) - base).abs().max() > 1e-2, name
    for model in ({"layer_types": ["full"] * 3}, {"clamped_swiglu": {"alpha": 1.702, "limit": 7.0}}):
        assert (reference_forward(BASE.replace(model=model), w, ids) - base).abs().max() > 1e-2, model


def greedy(spec, w, prompt, steps):
    """Greedy continuation by the reference, recomputing the whole sequence each step (no cache)."""
    seq = prompt.clone()
    for _ in range(steps):
        one = spec.replace(model={"batch_size": 1, "seq_len": len(seq)}, schedule={"micro_batches": 1})
        logits = reference_forward(one, w, seq[None])[0, -1]
        seq = torch.cat([seq, logits.argmax()[None]])
    return seq


@pytest.mark.parametrize("path", ["torch", "triton"])
def test_generate_past_the_window_equals_recomputing(path, monkeypatch):
    """Prompts of 5 and 2 tokens, 5 new: decode steps read past the window of 3 (Triton: the split
    kernel's window and sinks in place)."""
    monkeypatch.setenv("PYENGINE_KERNELS", path)
    spec = BASE.replace(model={"batch_size": 2, "seq_len": 10})
    w = init_weights(spec, 3)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, spec.model.vocab_size, (n,), generator=g) for n in (5, 2)]
    transports = LocalTransport.create(3, "cpu", 60)

    def rank(r):
        e = Engine(spec, transports[r], seed=3)
        return e.generate(prompts, 5), e.last_generation.first_logits

    (seqs, logits), = [o for o in on_threads(rank, timeout_s=300) if o[1] is not None]  # the output rank's
    for p, got in zip(prompts, seqs):
        assert torch.equal(got, greedy(spec, w, p, 5))
    for step in range(5):  # the first sequence's logits at each step, its decode steps included
        seq = seqs[0][:len(prompts[0]) + step]
        one = spec.replace(model={"batch_size": 1, "seq_len": len(seq)}, schedule={"micro_batches": 1})
        torch.testing.assert_close(logits[step], reference_forward(one, w, seq[None])[0, -1], rtol=1e-5, atol=1e-5)
