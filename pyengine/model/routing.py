"""How tokens spread over experts, for the planner: uniform (T*k/E pairs per expert) or measured
(the router run on real weights and tokens). Expert-parallel costs depend on it: a GPU holding
experts S receives the tokens that chose at least one expert in S and computes their pairs.

Both kinds answer per-batch shares; a micro-batch of t tokens is charged t times the share
(the batch's imbalance is kept; its variation between micro-batches is not).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True, slots=True)
class MeasuredRouting(Routing):
    """The router's real choices for one batch, kept as (expert set, token count) pairs."""

    choices: tuple[tuple[tuple[int, ...], int], ...] = ()
    tokens: int = 0

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


def uniform(spec: DeploymentSpec) -> Routing:
    return Routing(spec.model.num_experts, spec.model.top_k)


def imbalance(routing: Routing) -> float:
    """Busiest expert's load over the mean load (1.0 = perfectly even)."""
    loads = routing.expert_loads()
    return max(loads) * len(loads)
