"""Non-finite logits stop a generation with an error naming the step and the sequences, on every
rank, instead of returning ids drawn from NaN."""

import pytest
import torch

from helpers import TINY_CONFIG, _threads
from pyengine.core.spec import load_spec
from pyengine.execute.faults import Fault
from pyengine.execute.generate import Generator
from pyengine.execute.step_loop import NonFiniteLogits
from pyengine.model.weights import rank_weights
from pyengine.transport.local import LocalTransport

SPEC = load_spec(TINY_CONFIG).replace(model={
    "num_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 6},
    schedule={"micro_batches": 2})
PROMPTS = [torch.tensor([5, 9, 11]), torch.tensor([7, 2, 3, 4, 1])]


def _generate(fault: Fault | None, poison_at_load: bool = False) -> list:
    transports = LocalTransport.create(3, "cpu", 30)

    def rank(r):
        w = rank_weights(SPEC, 3, r, torch.device("cpu"))
        if poison_at_load and r == 1:
            for t in w.values():
                t.fill_(float("nan"))
        gen = Generator(SPEC, r, transports[r], w, torch.device("cpu"))
        gen.fault = fault
        return gen.generate(PROMPTS, max_new_tokens=4, timed=False)
    out, hung = _threads(rank, 3, 120)
    assert not hung
    return out


def test_nan_weights_from_decode_step_one_name_that_step_on_every_rank():
    out = _generate(Fault(1, "l0.s1.mb0.COMPUTE", "nan"))
    assert all(isinstance(e, NonFiniteLogits) for e in out), out
    assert {e.step for e in out} == {1} and {tuple(e.slots) for e in out} == {(0, 1)}
    assert "at decode step 1 for the sequence(s) in KV slot(s) [0, 1]" in str(out[0])


def test_nan_weights_at_load_are_caught_at_the_prefill():
    out = _generate(None, poison_at_load=True)
    assert all(isinstance(e, NonFiniteLogits) and e.step == 0 for e in out), out
    assert "at the prefill (step 0)" in str(out[0])


def test_finite_weights_generate():
    out = _generate(None)
    assert all(not isinstance(r, BaseException) and len(r.sequences) == 2 for r in out), out
