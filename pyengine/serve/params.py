"""What a request asks for: how many new ids at most, how each is drawn, and which ids end it.

    params = SamplingParams(max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1234)

Every field is checked when the object is made (an InputError naming the field, the value and the
rule), so a bad request is refused before it reaches the scheduler; the HTTP server maps the same
error to a 400 naming the request's own field (max_tokens, temperature, ...).
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from pyengine.core.errors import InputError
from pyengine.core.limits import check_number
from pyengine.execute.step_plan import Sampling

MAX_TEMPERATURE = 100.0
"""Highest temperature accepted: beyond it every draw is uniform noise to fp32's resolution."""
MAX_SAMPLING_SEED = 2**63 - 1
"""Seeds are int64 counters of the on-device noise: any non-negative int64."""
MAX_STOP_IDS = 1024
"""Stop ids one request may list."""


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 16
    """New ids at most (the request ends earlier at a stop id)."""
    temperature: float = 0.0
    """0: greedy (the argmax, ties to the lower id); else softmax(logits / temperature)."""
    top_k: int = 0
    """Draw among the k most likely ids only (0: all)."""
    top_p: float = 1.0
    """Draw among the fewest most likely ids whose probability reaches top_p (1: all)."""
    seed: int = 0
    """The noise's counter key: the same seed gives the same ids whatever else runs."""
    stop_token_ids: tuple[int, ...] = ()
    """Ids that end the request (kept as its last id), beside the model's end-of-sequence ids."""
    ignore_eos: bool = False
    """Run on past the model's end-of-sequence ids (to max_new_tokens or a stop id): fixed-length
    outputs for benchmarks."""

    def __post_init__(self) -> None:
        from pyengine.model.prompts import MAX_NEW_TOKENS

        check_number("max_new_tokens", self.max_new_tokens, lo=1, hi=MAX_NEW_TOKENS, integer=True)
        check_number("temperature", self.temperature, lo=0, hi=MAX_TEMPERATURE)
        check_number("top_k", self.top_k, lo=0, hi=2**31 - 1, integer=True)
        check_number("top_p", self.top_p, lo=0, hi=1, lo_open=True)
        check_number("seed", self.seed, lo=0, hi=MAX_SAMPLING_SEED, integer=True)
        if not isinstance(self.ignore_eos, bool):
            raise InputError("ignore_eos", self.ignore_eos, "must be true or false")
        ids = self.stop_token_ids
        if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
            raise InputError("stop_token_ids", ids, "must be a list of token ids")
        ids = tuple(ids)
        if len(ids) > MAX_STOP_IDS:
            raise InputError("stop_token_ids", f"{len(ids)} ids", f"at most {MAX_STOP_IDS}")
        for i, token in enumerate(ids):
            if not isinstance(token, numbers.Integral) or isinstance(token, bool) or token < 0:
                raise InputError(f"stop_token_ids[{i}]", token, "must be a non-negative integer")
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))

    @property
    def sampling(self) -> Sampling:
        """How the step loop draws this request's ids."""
        return Sampling(float(self.temperature), int(self.top_k), float(self.top_p), int(self.seed))

    def check_vocab(self, vocab_size: int) -> None:
        """Stop ids inside the model's vocabulary (known only once the model is)."""
        for i, token in enumerate(self.stop_token_ids):
            if token >= vocab_size:
                raise InputError(f"stop_token_ids[{i}]", token, f"must be < the vocabulary's {vocab_size} ids")
