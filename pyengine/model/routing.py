"""How tokens spread over experts, for the planner: uniform (T*k/E pairs per expert) or measured
(the router run on real weights and tokens). Expert-parallel costs depend on it: a GPU holding
experts S receives the tokens that chose at least one expert in S and computes their pairs.

Both kinds answer per-batch shares; a micro-batch of t tokens is charged t times the share
(the batch's imbalance is kept; its variation between micro-batches is not).

Experts touched (the one home of this count; every expert GEMM's weight traffic follows from it):
a micro-batch of t tokens streams the weights of each expert at least one of its tokens chose.
Expert e is chosen by a fraction s_e of tokens (uniform: s_e = k/E); t tokens drawn
independently miss it with probability (1 - s_e)^t, so the expected number touched among S is
sum over e in S of 1 - (1 - s_e)^t -- under uniform routing |S| (1 - (1 - k/E)^t), E (1 - (1 -
k/E)^t) for all E experts (not min(E, t k): two tokens often pick the same expert).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from math import comb
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from pyengine.core.spec import DeploymentSpec


@dataclass(frozen=True, slots=True)
class Routing:
    """Uniform routing: every k-subset of the E experts equally likely for every token."""

    num_experts: int
    top_k: int

    @property
    def source(self) -> str:
        return "uniform"

    def pair_share(self, experts: Iterable[int]) -> float:
        """Fraction of all (token, expert) pairs whose expert is in `experts`."""
        return len(set(experts)) / self.num_experts

    def token_share(self, experts: Iterable[int]) -> float:
        """Fraction of tokens with at least one of their k experts in `experts`."""
        n, e, k = len(set(experts)), self.num_experts, self.top_k
        return 1.0 - comb(e - n, k) / comb(e, k)

    def expert_loads(self) -> tuple[float, ...]:
        """Share of pairs per expert."""
        return tuple(1.0 / self.num_experts for _ in range(self.num_experts))

    def experts_touched(self, experts: Iterable[int], tokens: float) -> float:
        """Expected number of `experts` at least one of `tokens` tokens chose (module docstring)."""
        n = len(set(experts))
        return n * (1.0 - (1.0 - self.top_k / self.num_experts) ** tokens)


@dataclass(frozen=True, slots=True)
class MeasuredRouting(Routing):
    """The router's real choices for one batch, kept as (expert set, token count) pairs."""

    choices: tuple[tuple[tuple[int, ...], int], ...] = ()
    tokens: int = 0
    _token_shares: tuple[float, ...] = field(default=(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Each token chooses an expert at most once: its token share is k times its pair share.
        shares = tuple(self.top_k * x for x in self.expert_loads()) if self.tokens else ()
        object.__setattr__(self, "_token_shares", shares)

    @property
    def source(self) -> str:
        return "measured"

    @classmethod
    def from_ids(cls, top_ids: torch.Tensor, num_experts: int) -> MeasuredRouting:
        """From the router's top-k ids [T, k] of a batch."""
        counts = Counter(tuple(sorted(row)) for row in top_ids.tolist())
        return cls(num_experts, top_ids.shape[1], tuple(sorted(counts.items())), top_ids.shape[0])

    def pair_share(self, experts: Iterable[int]) -> float:
        s = set(experts)
        hits = sum(n * len(s.intersection(c)) for c, n in self.choices)
        return hits / (self.tokens * self.top_k)

    def token_share(self, experts: Iterable[int]) -> float:
        s = set(experts)
        return sum(n for c, n in self.choices if s.intersection(c)) / self.tokens

    def expert_loads(self) -> tuple[float, ...]:
        per = [0] * self.num_experts
        for c, n in self.choices:
            for e in c:
                per[e] += n
        return tuple(p / (self.tokens * self.top_k) for p in per)

    def experts_touched(self, experts: Iterable[int], tokens: float) -> float:
        return sum(1.0 - (1.0 - self._token_shares[e]) ** tokens for e in set(experts))


def uniform(spec: DeploymentSpec) -> Routing:
    return Routing(spec.model.num_experts, spec.model.top_k)


def imbalance(routing: Routing) -> float:
    """Busiest expert's load over the mean load (1.0 = perfectly even)."""
    loads = routing.expert_loads()
    return max(loads) * len(loads)
