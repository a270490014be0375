"""Collectives and their ring cost factors: one definition for the planner's traffic, the device
model's times and the comm benchmark's bus bandwidth (nccl-tests' factors)."""

from __future__ import annotations

import enum


class Collective(str, enum.Enum):
    ALL_REDUCE = "all_reduce"
    REDUCE_SCATTER = "reduce_scatter"
    BROADCAST = "broadcast"
    SENDRECV = "sendrecv"

    def bus_factor(self, n: int) -> float:
        """Bytes each rank moves per byte of buffer on a ring of n ranks (nccl-tests' busbw
        factor): all-reduce 2(n-1)/n, reduce-scatter (n-1)/n, broadcast and send/recv 1."""
        if self is Collective.ALL_REDUCE:
            return 2.0 * (n - 1) / n
        if self is Collective.REDUCE_SCATTER:
            return (n - 1) / n
        return 1.0

    def ring_steps(self, n: int) -> int:
        """Latency-bound steps of the ring algorithm: 2(n-1) for all-reduce, n-1 for
        reduce-scatter and broadcast, 1 for a single send/recv."""
        if self is Collective.ALL_REDUCE:
            return 2 * (n - 1)
        if self is Collective.SENDRECV:
            return 1
        return n - 1
