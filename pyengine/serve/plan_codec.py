"""A StepPlan as one int64 tensor and back, for the broadcast from the scheduling rank.

Layout (all int64):

    [VERSION, works, releases, tokens]                      the head, HEAD_WORDS
    release slots                                           `releases` words
    per work: slot, past, len(tokens), sample, index,
              temperature, top_k, top_p, seed               WORK_WORDS each
    every work's tokens, concatenated in plan order         `tokens` words

temperature and top_p travel as the bits of their float64 value, so a plan decodes to exactly the
plan that was encoded (a round trip is the identity).
"""

from __future__ import annotations

import struct

import torch

from pyengine.execute.step_plan import Sampling, SeqWork, StepPlan

VERSION = 1
HEAD_WORDS = 4
WORK_WORDS = 9


class PlanCodecError(ValueError):
    """A tensor that is not an encoded plan (a different version, or lengths that disagree)."""


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(bits: int) -> float:
    return struct.unpack("<d", struct.pack("<q", int(bits)))[0]


def encode(plan: StepPlan) -> torch.Tensor:
    """The plan as a 1-D int64 CPU tensor."""
    words = [VERSION, len(plan.work), len(plan.release), sum(len(w.tokens) for w in plan.work)]
    words += [int(s) for s in plan.release]
    for w in plan.work:
        s = w.sampling
        words += [w.slot, w.past, len(w.tokens), int(w.sample), w.index,
                  _float_bits(s.temperature), s.top_k, _float_bits(s.top_p), s.seed]
    for w in plan.work:
        words += [int(t) for t in w.tokens]
    return torch.tensor(words, dtype=torch.int64)


def encoded_words(plan: StepPlan) -> int:
    return HEAD_WORDS + len(plan.release) + WORK_WORDS * len(plan.work) + sum(len(w.tokens) for w in plan.work)


def decode(data: torch.Tensor) -> StepPlan:
    """The plan `encode` made (data: 1-D int64, any device)."""
    words = data.reshape(-1).tolist()  # intended sync: a follower's plan reaches its host
    if len(words) < HEAD_WORDS or words[0] != VERSION:
        raise PlanCodecError(f"not an encoded step plan (head {words[:HEAD_WORDS]}; version {VERSION} expected)")
    _, works, releases, tokens = words[:HEAD_WORDS]
    want = HEAD_WORDS + releases + WORK_WORDS * works + tokens
    if min(works, releases, tokens) < 0 or len(words) != want:
        raise PlanCodecError(f"an encoded step plan of {len(words)} words; its head says {want}")
    at = HEAD_WORDS
    release = tuple(words[at:at + releases])
    at += releases
    fields = [words[at + i * WORK_WORDS: at + (i + 1) * WORK_WORDS] for i in range(works)]
    at += WORK_WORDS * works
    work = []
    for slot, past, n, sample, index, temperature, top_k, top_p, seed in fields:
        sampling = Sampling(_bits_float(temperature), top_k, _bits_float(top_p), seed)
        work.append(SeqWork(slot, tuple(words[at:at + n]), past, bool(sample), sampling, index))
        at += n
    if at != len(words):
        raise PlanCodecError(f"the works' token counts add up to {at - want + tokens}; the head says {tokens}")
    return StepPlan(tuple(work), release)
