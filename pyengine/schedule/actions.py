"""Actions: what one rank does, in table order. Ids are built here and nowhere else.

Each rank issues its actions in table order. COMPUTE actions run on the rank's compute
stream; SEND/RECV/REDUCE on its comm stream(s), in order (NCCL matches messages between a
pair of ranks by issue order; it has no tags). `deps` name the actions on the same rank
whose results an action consumes (typed ids, never parsed back): the runtime waits on
exactly those.
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

    def __str__(self) -> str:
        base = f"s{int(self.stage)}.mb{self.micro_batch}.{self.kind.value}"
        if self.kind is Kind.SEND:
            return f"{base}.{self.payload.value}->{self.peers[0]}"
        if self.kind is Kind.RECV:
            return f"{base}.{self.payload.value}<-{self.peers[0]}"
        if self.kind is Kind.REDUCE:
            return f"{base}.{self.payload.value}@{','.join(map(str, self.peers))}"
        return base


def compute_id(stage: int, micro_batch: int) -> ActionId:
    return ActionId(Kind.COMPUTE, stage, micro_batch)


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
    key: ActionId = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", ActionId(self.kind, int(self.stage), self.micro_batch,
                                                 self.payload, tuple(self.peers)))

    @property
    def id(self) -> str:
        """Unique per rank; also the NVTX range name and the label of its span in a timeline."""
        return str(self.key)


Table = dict[int, list[Action]]


class ScheduleError(ValueError):
    """A table cannot run: unmatched messages, a missing dependency or a deadlock."""


def pair(src: int, dst: int, send_stage: int, recv_stage: int, micro_batch: int, payload: Payload,
         deps: tuple[ActionId, ...]) -> list[Action]:
    """A matched SEND/RECV of `payload` from src to dst."""
    return [Action(src, Kind.SEND, send_stage, micro_batch, payload, (dst,), deps),
            Action(dst, Kind.RECV, recv_stage, micro_batch, payload, (src,))]
