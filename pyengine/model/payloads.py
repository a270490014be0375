"""What moves between stages: one enumeration, with each payload's buffers (shapes and dtypes)
for a micro-batch. The planner's byte counts and the runtime's receive buffers both come from
`Payload.buffers`, so the bytes predicted and the bytes sent cannot disagree."""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple

from pyengine.core import dtypes
from pyengine.core.collectives import Collective

if TYPE_CHECKING:
    from pyengine.core.spec import DeploymentSpec

ROUTING_IDS_DTYPE = "int32"  # top-k expert ids travel as int32
ROUTING_WEIGHTS_DTYPE = "float32"  # top-k weights travel as fp32 (renormalised in fp32)


class Buffer(NamedTuple):
    rows: int
    cols: int
    dtype: str

    @property
    def nbytes(self) -> int:
        return self.rows * self.cols * dtypes.nbytes(self.dtype)


class Payload(str, enum.Enum):
    """A named value that a stage produces and another consumes (the value is the id label)."""

    ACT = "act"
    """u [T, H] + top-k ids [T, k] int32 + top-k weights [T, k] fp32: the experts' input."""
    RESID = "resid"
    """x [T, H]: the embedding output, kept for the output stage's residual add."""
    PARTIAL = "partial"
    """One expert shard's unreduced y_r [T, H]."""
    SUM = "sum"
    """y [T, H] after the experts group's all-reduce."""
    HALF = "half"
    """One member's token chunk of the reduce-scatter output: ceil(T / n) rows (chunks are
    padded to equal size because NCCL's reduce-scatter takes equal counts)."""
    ROUTES = "routes"
    """The router's top-k expert ids [T, k] int32 of a micro-batch; never sent: the run reads the
    router's real per-expert load from it."""
    LOGITS = "logits"
    """The output stage's result [T, V]; handed to the caller, never sent between stages."""
    DISPATCH = "dispatch"
    """Expert parallel, router -> one expert GPU: the n tokens with at least one expert there:
    u rows [n, H], [token index, local expert id per slot (-1: not here)] [n, 1+k] int32,
    router weights per slot [n, k] fp32 (0 where not here). n depends on the routing."""
    COMBINE = "combine"
    """Expert parallel, one expert GPU -> output: the weighted sum of its experts' outputs for
    each token it received, rows [n, H], and the token indices [n, 1] int32."""

    @property
    def sized(self) -> bool:
        """Its row count depends on the routing: a count message goes first (two-phase)."""
        return self in (Payload.DISPATCH, Payload.COMBINE)

    @property
    def sized_by_receiver(self) -> bool:
        """The expert GPU whose rows size the message is its receiver (dispatch) or sender."""
        return self is Payload.DISPATCH

    @property
    def collective(self) -> Collective | None:
        """The collective that produces this payload inside a group, if any."""
        return {Payload.SUM: Collective.ALL_REDUCE, Payload.HALF: Collective.REDUCE_SCATTER}.get(self)

    def buffers(self, spec: DeploymentSpec, tokens: int) -> tuple[Buffer, ...]:
        """The tensors one message of this payload carries for a `tokens`-token micro-batch."""
        m = spec.model
        act = m.dtype
        if self is Payload.ACT:
            return (Buffer(tokens, m.hidden_size, act), Buffer(tokens, m.top_k, ROUTING_IDS_DTYPE),
                    Buffer(tokens, m.top_k, ROUTING_WEIGHTS_DTYPE))
        if self is Payload.HALF:
            return (Buffer(chunk_rows(tokens, experts_group_size(spec)), m.hidden_size, act),)
        if self is Payload.LOGITS:
            return (Buffer(tokens, m.vocab_size, act),)
        if self is Payload.DISPATCH:  # `tokens` = rows routed to the receiving GPU
            return (Buffer(tokens, m.hidden_size, act), Buffer(tokens, 1 + m.top_k, ROUTING_IDS_DTYPE),
                    Buffer(tokens, m.top_k, ROUTING_WEIGHTS_DTYPE))
        if self is Payload.COMBINE:  # `tokens` = rows the sending GPU received
            return (Buffer(tokens, m.hidden_size, act), Buffer(tokens, 1, ROUTING_IDS_DTYPE))
        return (Buffer(tokens, m.hidden_size, act),)

    def nbytes(self, spec: DeploymentSpec, tokens: int) -> int:
        return sum(b.nbytes for b in self.buffers(spec, tokens))

    def reduced_bytes(self, spec: DeploymentSpec, tokens: int) -> int:
        """Bytes of the buffer each group member hands to this payload's collective."""
        if self.collective is None:
            raise ValueError(f"payload {self.value!r} is not produced by a collective")
        if self is Payload.HALF:  # the input holds every member's (padded) chunk
            return self.nbytes(spec, tokens) * experts_group_size(spec)
        return self.nbytes(spec, tokens)


COUNT = Buffer(1, 1, "int64")
"""The row count that goes ahead of a sized payload."""


class PerRank(dict):
    """A payload value that differs per destination rank ({rank: tensors}): the router's
    dispatch holds one slice per expert GPU; each consumer takes its own."""


def chunk_rows(tokens: int, members: int) -> int:
    """Rows of one member's reduce-scatter chunk: the tokens split into equal, padded chunks."""
    return -(-tokens // members)


def experts_group_size(spec: DeploymentSpec) -> int:
    return len(spec.stage("experts").gpus)
