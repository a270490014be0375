"""The experts -> output hand-off patterns (`comm.boundary`), one object each.

A boundary says which payload reaches the output stage, whether the experts group reduces it
with a collective first, who sends it, and how the output stage turns what it received into
the partial sums its first kernel adds. The schedule builder, the cost model and the output
stage all ask the boundary; adding a pattern means adding one class here (and a payload in
pyengine.model.payloads if it moves something new).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyengine.model.costs import KernelCost
from pyengine.model.payloads import Payload

if TYPE_CHECKING:
    from pyengine.core.spec import DeploymentSpec
    from pyengine.model.stages.base import Stage

Inputs = Mapping[Payload, Sequence[tuple[Any, ...]]]
"""A compute's inputs: per payload, the received (or locally produced) tensors in dep order."""


@dataclass(frozen=True, slots=True)
class Boundary:
    name: str
    payload: Payload
    """What the output stage receives from the experts group."""
    reduces: bool
    """True: the group runs payload.collective before anything is sent."""

    def senders(self, group: Sequence[int], output: int) -> tuple[int, ...]:
        """Members whose payload the output stage consumes, in group order."""
        return tuple(group)

    def output_reads(self, group_size: int) -> int:
        """Partial-sum tensors the output stage's first kernel reads per micro-batch."""
        return 1

    def gather(self, inputs: Inputs, tokens: int) -> list[Any]:
        """The partial sums (each [tokens, H]) that the output stage adds to the residual."""
        return [v[0] for v in inputs[self.payload]]

    def incoming_bytes(self, experts: Stage, tokens: int) -> float:
        """Bytes of the experts' results the output stage holds for one micro-batch."""
        m = experts.spec.model
        return self.output_reads(len(experts.ranks)) * tokens * m.hidden_size * experts.elem

    def output_kernels(self, experts: Stage, tokens: int) -> list[KernelCost]:
        """Kernels the output stage runs on what it received before the residual + norm."""
        return []

    def residual_kernels(self, experts: Stage, tokens: int, store_residual: bool) -> list[KernelCost]:
        """What the consumer of the hand-off (the output head, or the next layer's attention)
        runs first: output_kernels, then one fused residual + partial sums + RMSNorm that reads
        x and every partial once and writes the normed rows (and the new residual, if stored)."""
        m = experts.spec.model
        row = tokens * m.hidden_size * experts.elem
        moved = (2 + int(store_residual) + self.output_reads(len(experts.ranks))) * row
        return self.output_kernels(experts, tokens) + [
            KernelCost.memory("residual_sum_rmsnorm", moved + m.hidden_size * experts.elem)]


class _AllReduce(Boundary):
    def senders(self, group: Sequence[int], output: int) -> tuple[int, ...]:
        # The output GPU, when it is in the group, already holds the sum: nobody sends.
        return (output if output in group else group[0],)


class _ReduceScatter(Boundary):
    def gather(self, inputs: Inputs, tokens: int) -> list[Any]:
        import torch

        chunks = [v[0] for v in inputs[self.payload]]  # group order = token order
        return [torch.cat(chunks)[:tokens]]  # the last chunk's padding rows are dropped


class _Partials(Boundary):
    def output_reads(self, group_size: int) -> int:
        return group_size  # summed in the output's first kernel, no collective


class _Combine(Boundary):
    """Expert parallel: every expert GPU returns one row per token it received; the output
    stage scatter-adds them (fp32, expert GPUs in stage order: deterministic) into one partial."""

    def gather(self, inputs: Inputs, tokens: int) -> list[Any]:
        import torch

        received = inputs[self.payload]
        rows0 = received[0][0]
        y = torch.zeros(tokens, rows0.shape[1], dtype=torch.float32, device=rows0.device)
        for rows, token in received:  # a token appears once per sender: no colliding adds
            y.index_add_(0, token.view(-1).long(), rows.float())
        return [y]

    def incoming_bytes(self, experts: Stage, tokens: int) -> float:
        m = experts.spec.model
        rows = sum(experts.rows_for(r, tokens) for r in experts.ranks)
        return Payload.COMBINE.nbytes(experts.spec, 1) * rows + tokens * m.hidden_size * 4

    def output_kernels(self, experts: Stage, tokens: int) -> list[KernelCost]:
        h = experts.spec.model.hidden_size
        rows = sum(experts.rows_for(r, tokens) for r in experts.ranks)
        return [KernelCost.memory("scatter_add_combine", rows * (h * experts.elem + 4) + 2 * tokens * h * 4)]


COMBINE = _Combine("combine", Payload.COMBINE, reduces=False)
"""The hand-off of the expert-parallel layout (comm.boundary applies to tensor parallelism)."""

BOUNDARIES: dict[str, Boundary] = {
    "all_reduce": _AllReduce("all_reduce", Payload.SUM, reduces=True),
    "reduce_scatter": _ReduceScatter("reduce_scatter", Payload.HALF, reduces=True),
    "partials": _Partials("partials", Payload.PARTIAL, reduces=False),
}


def boundary_of(spec: DeploymentSpec) -> Boundary:
    return COMBINE if spec.expert_parallel else BOUNDARIES[spec.comm.boundary]
