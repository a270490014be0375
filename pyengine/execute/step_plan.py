"""One step of the engine's step loop, as data: which sequences run, which tokens each feeds, where
each sits in the KV cache, and which produce a new id (and how it is drawn).

`generate` and `serve` are clients of one step loop (pyengine.execute.step_loop): they decide *what*
runs between steps (admission, who is live, when a sequence stops) and hand every rank the same
`StepPlan`; the step itself is a pure function of the plan and the ranks' persistent buffers. A
plan whose every sequence feeds one token is a decode step (static buffers, CUDA graphs); any
other (a prefill chunk among them) runs eagerly over the same KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Sampling:
    """How a sequence's next id is drawn: greedy when temperature is 0, else softmax(logits /
    temperature) restricted to the top_k ids (0: all) and the smallest set of ids whose
    probability reaches top_p, with noise that depends only on (seed, the id's index in its
    request): the same seed gives the same ids whatever else is in the batch."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()


@dataclass(frozen=True, slots=True)
class SeqWork:
    """One sequence's part of a step."""

    slot: int
    """Its KV-cache slot (a row of the block table), kept from admission to its end."""
    tokens: tuple[int, ...]
    """The ids it feeds this step: a chunk of its prompt, or its last new id (decode)."""
    past: int
    """Its tokens already in the KV cache (the first fed token's position)."""
    sample: bool = True
    """This step's last token yields its next id (False for a prefill chunk that is not the
    prompt's last)."""
    sampling: Sampling = GREEDY
    index: int = 0
    """The index, within its request, of the id this step draws (the sampling noise's counter)."""

    @property
    def decode(self) -> bool:
        return len(self.tokens) == 1 and self.past > 0


@dataclass(frozen=True, slots=True)
class StepPlan:
    """What every rank runs next; the same object on every rank."""

    work: tuple[SeqWork, ...]
    release: tuple[int, ...] = ()
    """Slots whose sequences ended: their KV blocks return to the free list before this step."""

    @property
    def decode_only(self) -> bool:
        """Every sequence feeds one cached-after token: the static (graphed) decode step."""
        return bool(self.work) and all(w.decode for w in self.work)

    @property
    def sampled(self) -> tuple[SeqWork, ...]:
        """The sequences that yield an id this step, in plan order (the order of the ids)."""
        return tuple(w for w in self.work if w.sample)
