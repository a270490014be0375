"""Actions: what one rank does, in table order. Ids are built here and nowhere else.

Ids carry the layer in a model of layers (`l3.s1.mb2.COMPUTE`) and none for the attention-free
block (`s1.mb2.COMPUTE`): one rule, the layer prefix exactly when the model has layers. A
message's layer is the layer of the data it moves (the layer that produced it), and its stage
the one it belongs to on its rank: `l3.s1.mb2.SEND.partial->0` on an expert GPU meets
`l3.s0.mb2.RECV.partial<-1` on the attention GPU, consumed by `l4.s0.mb2.COMPUTE`.

Each rank issues its actions in table order. COMPUTE actions run on the rank's compute
stream; SEND/RECV/REDUCE on its comm stream(s), in order (NCCL matches messages between a
pair of ranks by issue order; it has no tags). `deps` name the actions on the same rank
whose results an action consumes (typed ids, never parsed back): the runtime waits on
exactly those; `after` names actions it must follow without consuming their results.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pyengine.model.payloads import Payload


class Kind(str, enum.Enum):
    RECV = "RECV"
    COMPUTE = "COMPUTE"
    SEND = "SEND"
    REDUCE = "REDUCE"


@dataclass(frozen=True, slots=True)
class ActionId:
    """Names an action uniquely within its rank's table; str() is the NVTX range name."""

    kind: Kind
    stage: int
    """Stage the action belongs to on its rank (pyengine.model.stages.StageKind)."""
    micro_batch: int
    payload: Payload | None = None
    peers: tuple[int, ...] = ()
    layer: int | None = None
    """Decoder layer (None: the attention-free block)."""

    def __str__(self) -> str:
        where = "" if self.layer is None else f"l{self.layer}."
        base = f"{where}s{int(self.stage)}.mb{self.micro_batch}.{self.kind.value}"
        if self.kind is Kind.SEND:
            return f"{base}.{self.payload.value}->{self.peers[0]}"
        if self.kind is Kind.RECV:
            return f"{base}.{self.payload.value}<-{self.peers[0]}"
        if self.kind is Kind.REDUCE:
            return f"{base}.{self.payload.value}@{','.join(map(str, self.peers))}"
        return base


def compute_id(stage: int, micro_batch: int, layer: int | None = None) -> ActionId:
    return ActionId(Kind.COMPUTE, int(stage), micro_batch, layer=layer)


@dataclass(frozen=True, slots=True)
class Action:
    rank: int
    kind: Kind
    stage: int
    micro_batch: int
    payload: Payload | None = None
    """What moves (SEND/RECV/REDUCE); None for COMPUTE."""
    peers: tuple[int, ...] = ()
    """SEND: (dst,); RECV: (src,); REDUCE: the group, in rank order."""
    deps: tuple[ActionId, ...] = ()
    layer: int | None = None
    """Decoder layer of the compute, or of the data a message moves (None: the block)."""
    after: tuple[ActionId, ...] = ()
    """Actions on the same rank that must run first without handing it a value: the attention
    of earlier chunks of the same sequences, whose KV-cache entries this one reads."""
    key: ActionId = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ActionId(self.kind, int(self.stage), self.micro_batch,
                                                 self.payload, tuple(self.peers), self.layer))

    @property
    def message(self) -> tuple:
        """What a SEND/RECV/REDUCE moves: its partners must agree on it."""
        return (self.payload, self.micro_batch, self.layer)

    @property
    def id(self) -> str:
        """Unique per rank; also the NVTX range name and the label of its span in a timeline."""
        return str(self.key)


Table = dict[int, list[Action]]


class ScheduleError(ValueError):
    """A table cannot run: unmatched messages, a missing dependency or a deadlock."""


def pair(src: int, dst: int, send_stage: int, recv_stage: int, micro_batch: int, payload: Payload,
         deps: tuple[ActionId, ...], layer: int | None = None) -> list[Action]:
    """A matched SEND/RECV of `payload` (produced at `layer`) from src to dst."""
    return [Action(src, Kind.SEND, send_stage, micro_batch, payload, (dst,), deps, layer),
            Action(dst, Kind.RECV, recv_stage, micro_batch, payload, (src,), (), layer)]
