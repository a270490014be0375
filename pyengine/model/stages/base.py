"""What every stage answers (the base class) and the vocabulary the stage objects share."""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from pyengine.core import dtypes
from pyengine.model.costs import KernelCost
from pyengine.model.payloads import Payload

if TYPE_CHECKING:
    from pyengine.core.spec import DeploymentSpec


class StageKind(enum.IntEnum):
    """Stage index, in pipeline order (also the `s<N>` prefix of action ids)."""

    EMBED = 0
    EXPERTS = 1
    OUTPUT = 2


class Shard(NamedTuple):
    """The part of a full weight tensor a rank holds: some experts, some columns of F."""

    experts: tuple[int, ...] | None = None
    """Expert ids held (per-expert tensors only); None = every expert."""
    f_cols: tuple[int, int] | None = None
    """[start, end) of the FFN dimension F (expert tensors only); None = all of F."""


Inputs = Mapping[Payload, Sequence[tuple[Any, ...]]]


class Stage:
    """Base class: what every stage answers. Subclasses fill in the model-specific parts."""

    kind: StageKind
    weight_names: tuple[str, ...] = ()
    inputs: tuple[tuple[Payload, StageKind], ...] = ()
    """(payload, producing stage) pairs consumed from single-rank stages; the experts ->
    output hand-off is the boundary's (pyengine.model.boundaries)."""

    def __init__(self, spec: DeploymentSpec):
        self.spec = spec
        self.ranks: tuple[int, ...] = spec.parallel.stages[self.kind].gpus
        self.elem = dtypes.nbytes(spec.model.dtype)

    @property
    def name(self) -> str:
        return self.spec.parallel.stages[self.kind].name

    def flops(self, tokens: int, rank: int) -> float:
        return sum(k.flops for k in self.kernels(tokens, rank))

    def kernels(self, tokens: int, rank: int) -> list[KernelCost]:
        raise NotImplementedError

    def weight_shapes(self, rank: int) -> dict[str, tuple[int, ...]]:
        """Shapes of the weights `rank` holds for this stage (its slices, not the full tensors)."""
        raise NotImplementedError

    def weight_bytes(self, rank: int) -> dict[str, int]:
        return {n: _prod(s) * self.elem for n, s in self.weight_shapes(rank).items()}

    def shard(self, rank: int) -> Shard:
        """Which slice of this stage's weights `rank` holds (default: all of them)."""
        return Shard()

    def working_set(self, tokens: int, rank: int) -> tuple[int, int]:
        """(bytes live while one micro-batch computes, bytes that wait across micro-batches)."""
        raise NotImplementedError

    def part(self, rank: int) -> str:
        """The model part this rank holds for this stage (the module-division verdict)."""
        raise NotImplementedError

    def from_router(self, u: Any, top_ids: Any, top_w: Any) -> dict[Payload, Any]:
        """Experts stages only: the router's output (u, top-k ids, top-k weights) packaged as
        the payload(s) this stage consumes."""
        raise NotImplementedError

    def compute(self, weights: Mapping[str, Any], ids: Any, inputs: Inputs) -> dict[Payload, tuple]:
        """Run the stage on one micro-batch: `ids` are its token ids, `inputs` what it consumed."""
        raise NotImplementedError


def _prod(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out
