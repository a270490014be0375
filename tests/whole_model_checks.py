"""What the seeded whole-model tests of each family check alike: the pipeline's logits on 3
virtual ranks, greedy continuation by the reference (recomputing the whole sequence each step, no
cache), and generation through the engine equal to that continuation, logits included."""

from __future__ import annotations

import torch

from helpers import on_threads
from pyengine.execute.engine import Engine
from pyengine.model.forward import single_device
from pyengine.model.reference import reference_forward
from pyengine.model.weights import init_weights, make_tokens
from pyengine.transport.local import LocalTransport


def pipeline(spec, ids, seed=3):
    """The output rank's logits [tokens, vocab] of the pipeline on 3 virtual ranks."""
    transports = LocalTransport.create(3, "cpu", 30)
    out = on_threads(lambda r: Engine(spec, transports[r], seed=seed).forward(ids))
    return out[spec.stage("output").gpus[0]].reshape(-1, spec.model.vocab_size)


def check_pipeline_single_device_and_reference_agree(base, stages, m: int, tol: dict) -> None:
    """`base` with m micro-batches (and the stage map `stages`, None: its own): the single-device
    baseline and the pipeline on 3 virtual ranks equal the reference's logits within `tol`."""
    spec = base.replace(schedule={"micro_batches": m}, **({"parallel": {"stages": stages}} if stages else {}))
    w, ids = init_weights(spec, 3), make_tokens(spec, 4)
    want = reference_forward(spec, w, ids).reshape(-1, spec.model.vocab_size)
    torch.testing.assert_close(single_device(spec, w, ids.reshape(-1)), want, **tol)
    torch.testing.assert_close(pipeline(spec, ids), want, **tol)


def _one(spec, seq):
    return spec.replace(model={"batch_size": 1, "seq_len": len(seq)}, schedule={"micro_batches": 1})


def greedy(spec, w, prompt, steps):
    """Greedy continuation by the reference, recomputing the whole sequence each step (no cache)."""
    seq = prompt.clone()
    for _ in range(steps):
        seq = torch.cat([seq, reference_forward(_one(spec, seq), w, seq[None])[0, -1].argmax()[None]])
    return seq


def check_generate_equals_recomputing(spec, steps: int, tol: dict, timeout_s: float = 60) -> None:
    """Prompts of 5 and 2 tokens, `steps` new by the engine (seed 3, 3 virtual ranks): each sequence
    equals the reference's greedy continuation, and the first sequence's logits at every step (its
    decode steps included) equal the reference's within `tol`."""
    w = init_weights(spec, 3)
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(0, spec.model.vocab_size, (n,), generator=g) for n in (5, 2)]
    transports = LocalTransport.create(3, "cpu", 60)

    def rank(r):
        e = Engine(spec, transports[r], seed=3)
        return e.generate(prompts, steps), e.last_generation.first_logits

    (seqs, logits), = [o for o in on_threads(rank, timeout_s=timeout_s) if o[1] is not None]  # the output rank's
    for p, got in zip(prompts, seqs):
        assert torch.equal(got, greedy(spec, w, p, steps))
    for step in range(steps):
        seq = seqs[0][:len(prompts[0]) + step]
        torch.testing.assert_close(logits[step], reference_forward(_one(spec, seq), w, seq[None])[0, -1], **tol)
