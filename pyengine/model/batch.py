"""The token axis of one forward: which sequences it holds, where each starts, how micro-batches cut it.

A forward runs `new` tokens of each sequence, starting at position `past` (tokens of that sequence
already in the KV cache): a prefill has past = 0 and new = the prompt; a decode step has new = 1
and past = the sequence's length so far. The sequences' new tokens are concatenated on one flat
axis (no padding), and micro-batches cut that axis into near-even chunks: within one sequence
they are the chunks of a chunked prefill (chunk j attends to chunks <= j, so within a sequence
and a layer chunks run in order); in decode, where every sequence has one token, they are groups
of sequences. The runtime (receive sizes, what attention reads), the schedule (the chunk-order
dependency) and the planner (attention FLOPs and KV bytes per chunk) all ask this object.

The attention-free block uses the same object: B sequences of S tokens, past 0.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

from pyengine.core.spec import near_even_split

if TYPE_CHECKING:
    from pyengine.core.spec import DeploymentSpec


@dataclass(frozen=True, slots=True)
class Segment:
    """The part of one sequence inside a chunk: flat rows [lo, hi), at positions pos.. of `seq`."""

    seq: int
    """The sequence's KV-cache slot (its index in the batch unless the batch names slots)."""
    lo: int
    hi: int
    pos: int
    """Position (in its sequence) of the segment's first token."""

    @property
    def tokens(self) -> int:
        return self.hi - self.lo

    @property
    def keys(self) -> int:
        """Keys its last token attends to (the sequence's length once this segment is cached)."""
        return self.pos + self.tokens

    @property
    def attended(self) -> int:
        """Query-key pairs of causal attention: token at position p reads p + 1 keys."""
        return self.tokens * self.pos + self.tokens * (self.tokens + 1) // 2

    def attended_in(self, window: int) -> int:
        """Query-key pairs when a query sees at most its last `window` keys (0: all of them)."""
        if not window:
            return self.attended
        lo, hi = self.pos + 1, self.keys  # the keys each token reads, before the window's cap
        below = max(0, min(hi, window) - lo + 1)  # tokens under the cap: lo, lo + 1, ...
        return below * lo + below * (below - 1) // 2 + window * (self.tokens - below)

    def keys_in(self, window: int) -> int:
        """Cached key rows read: from the first key its first token sees (0: all of them)."""
        return self.keys - max(0, self.pos - window + 1) if window else self.keys


@dataclass(frozen=True, slots=True)
class Chunk:
    """One micro-batch: flat rows [lo, hi) and the sequence segments they hold, in order."""

    lo: int
    hi: int
    segments: tuple[Segment, ...]
    last_rows: tuple[int, ...] = ()
    """Rows (from lo) that are the last new token of their sequence: where generation reads logits."""

    @property
    def tokens(self) -> int:
        return self.hi - self.lo

    @property
    def attended(self) -> int:
        return sum(s.attended for s in self.segments)

    @property
    def keys_read(self) -> int:
        """Cached key rows read (each segment reads its sequence's keys once)."""
        return sum(s.keys for s in self.segments)

    def work_in(self, window: int) -> tuple[int, int]:
        """(query-key pairs, cached key rows read) when a query sees its last `window` keys (0: all)."""
        return sum(s.attended_in(window) for s in self.segments), sum(s.keys_in(window) for s in self.segments)

    @property
    def sequences(self) -> tuple[int, ...]:
        return tuple(s.seq for s in self.segments)


@dataclass(frozen=True)
class Batch:
    new: tuple[int, ...]
    """Tokens of each sequence in this forward."""
    past: tuple[int, ...]
    """Tokens of each sequence already cached before it."""
    micro_batches: int
    logits_all: bool = True
    """Logits for every token (a forward's output) or only for each sequence's last new token
    (generation: the head runs on those rows only)."""
    slots: tuple[int, ...] | None = None
    """The KV-cache slot of each sequence (None: 0, 1, ...): decode keeps only the live
    sequences of a batch, each in the slot it was prefilled into. Segments name slots."""

    def __post_init__(self) -> None:
        if len(self.new) != len(self.past) or not self.new:
            raise ValueError(f"new {self.new} / past {self.past}: one entry per sequence, at least one")
        if min(self.new) < 1 or min(self.past) < 0:
            raise ValueError(f"new {self.new} / past {self.past}: new >= 1, past >= 0")
        if not 1 <= self.micro_batches <= self.tokens:
            raise ValueError(f"micro_batches = {self.micro_batches}: must be in [1, {self.tokens}]")
        if self.slots is not None and (len(self.slots) != len(self.new) or len(set(self.slots)) != len(self.slots)):
            raise ValueError(f"slots {self.slots}: one distinct slot per sequence")

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def prefill(cls, lengths: tuple[int, ...] | list[int], micro_batches: int,
                logits_all: bool = True) -> Batch:
        return cls(tuple(lengths), tuple(0 for _ in lengths), micro_batches, logits_all)

    @classmethod
    def decode(cls, past: tuple[int, ...] | list[int], micro_batches: int,
               slots: tuple[int, ...] | list[int] | None = None) -> Batch:
        """One new token per sequence; micro-batches are near-even groups of sequences."""
        return cls(tuple(1 for _ in past), tuple(past), min(micro_batches, len(past)), False,
                   None if slots is None else tuple(slots))

    @classmethod
    def of_spec(cls, spec: DeploymentSpec) -> Batch:
        """The spec's own batch: batch_size sequences of seq_len tokens, prefilled (one object per
        spec: its chunks are worked out once, however often the spec's costs are asked)."""
        return _spec_batch(spec)

    # ---- the flat axis ----------------------------------------------------------------------
    @property
    def sequences(self) -> int:
        return len(self.new)

    @property
    def tokens(self) -> int:
        return sum(self.new)

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """Flat row of each sequence's first new token."""
        out, at = [], 0
        for n in self.new:
            out.append(at)
            at += n
        return tuple(out)

    @cached_property
    def chunks(self) -> tuple[Chunk, ...]:
        out, lo = [], 0
        ends = {start + n - 1 for start, n in zip(self.starts, self.new)}
        for n in near_even_split(self.tokens, self.micro_batches):
            last = tuple(sorted(r - lo for r in ends if lo <= r < lo + n))  # per sequence, not per token
            out.append(Chunk(lo, lo + n, self._segments(lo, lo + n), last))
            lo += n
        return tuple(out)

    def _segments(self, lo: int, hi: int) -> tuple[Segment, ...]:
        segs = []
        slots = self.slots if self.slots is not None else range(len(self.new))
        for seq, start, n, past in zip(slots, self.starts, self.new, self.past):
            a, b = max(lo, start), min(hi, start + n)
            if a < b:
                segs.append(Segment(seq, a, b, past + a - start))
        return tuple(segs)

    def sizes(self) -> list[int]:
        return [c.tokens for c in self.chunks]

    def bounds(self) -> list[tuple[int, int]]:
        return [(c.lo, c.hi) for c in self.chunks]

    def positions(self) -> list[int]:
        """Position in its sequence of every flat row."""
        return [p for n, past in zip(self.new, self.past) for p in range(past, past + n)]

    def kv_order(self) -> list[tuple[int, int]]:
        """(earlier, later) micro-batch pairs that share a sequence: the later one's attention
        reads what the earlier one cached, so within a layer it must run after it."""
        last: dict[int, int] = {}
        pairs = []
        for j, c in enumerate(self.chunks):
            for seq in c.sequences:
                if seq in last and (last[seq], j) not in pairs:
                    pairs.append((last[seq], j))
                last[seq] = j
        return pairs

    @property
    def lengths(self) -> tuple[int, ...]:
        """Each sequence's length after this forward (what the KV cache then holds)."""
        return tuple(p + n for p, n in zip(self.past, self.new))


@functools.lru_cache(maxsize=256)
def _spec_batch(spec: DeploymentSpec) -> Batch:
    m = spec.model
    return Batch.prefill([m.seq_len] * m.batch_size, spec.schedule.micro_batches)
