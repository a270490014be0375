"""The scheduling rank tells every other rank what to do next: a plan to run, nothing yet, or stop.

Each message is two broadcasts from the root over all ranks: a fixed-size head [kind, words]
(so a follower knows how much to receive), then, for a plan, its encoded words
(pyengine.serve.plan_codec). Followers block in the head's broadcast between steps; an idle root
sends IDLE heads now and then so that their waits never reach the transport's timeout.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch

from pyengine.execute.step_plan import StepPlan
from pyengine.serve import plan_codec
from pyengine.transport.base import complete

HEAD_WORDS = 2


class Kind(enum.IntEnum):
    PLAN = 1
    IDLE = 2
    """Nothing to run yet (keeps the followers' waits short of the timeout)."""
    STOP = 3
    """The server is done: followers leave their loop."""


@dataclass(frozen=True, slots=True)
class Message:
    kind: Kind
    plan: StepPlan | None = None


class PlanChannel:
    def __init__(self, transport, root: int, world_size: int, timeout_s: float):
        self.transport, self.root, self.timeout_s = transport, root, timeout_s
        self.group = tuple(range(world_size))
        self.device = transport.device
        self.messages = 0
        """Messages sent or received so far (every rank agrees on it)."""

    @property
    def is_root(self) -> bool:
        return self.transport.rank == self.root

    def send(self, kind: Kind, plan: StepPlan | None = None) -> None:
        """Root only: one message to every other rank."""
        payload = plan_codec.encode(plan) if kind is Kind.PLAN else None
        head = torch.tensor([int(kind), 0 if payload is None else payload.numel()], dtype=torch.int64)
        self._broadcast(head.to(self.device), "serve.plan_head")
        if payload is not None:
            self._broadcast(payload.to(self.device), "serve.plan")
        self.messages += 1

    def receive(self) -> Message:
        """Followers: the root's next message."""
        head = torch.empty(HEAD_WORDS, dtype=torch.int64, device=self.device)
        self._broadcast(head, "serve.plan_head")
        kind, words = head.tolist()  # intended sync: the plan's size decides what to receive
        self.messages += 1
        kind = Kind(kind)
        if kind is not Kind.PLAN:
            return Message(kind)
        payload = torch.empty(words, dtype=torch.int64, device=self.device)
        self._broadcast(payload, "serve.plan")
        return Message(kind, plan_codec.decode(payload))

    def _broadcast(self, tensor: torch.Tensor, name: str) -> None:
        complete([self.transport.broadcast(tensor, self.root, self.group, name=name)], self.timeout_s)
