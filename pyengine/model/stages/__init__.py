"""The three stages of a layer's trip, one object each: the attention GPU's part (embedding,
attention, router), the experts, and the output head after the last layer. A model of L layers
runs the first two at every layer; the attention-free block is the one-layer case without
attention (embed + router, experts, output head).

Each stage answers, at a layer, for a rank that runs it: its FLOPs and the kernels it launches (FLOPs and
HBM bytes each, for the roofline), the weights it holds (names, slices, bytes), its activation
working set, the model part it is, what it consumes from which stage, and `compute` itself
(torch, imported on call). The schedule, the planner, the simulator and the runtime all ask
these objects; none of them branches on a stage number.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from pyengine.model.stages.base import Inputs, KernelCost, Shard, Source, Stage, StageKind, Work
from pyengine.model.stages.embed import EmbedStage
from pyengine.model.stages.expert_parallel import ExpertParallelStage
from pyengine.model.stages.experts import ExpertsStage
from pyengine.model.stages.output import OutputStage

if TYPE_CHECKING:
    from pyengine.core.spec import DeploymentSpec
    from pyengine.model.routing import Routing

__all__ = ["EmbedStage", "ExpertParallelStage", "ExpertsStage", "Inputs", "KernelCost", "OutputStage",
           "Shard", "Source", "Stage", "StageKind", "Work", "rank_flops", "stages_of", "stages_on"]


@functools.lru_cache(maxsize=256)
def stages_of(spec: DeploymentSpec, routing: Routing | None = None) -> tuple[Stage, ...]:
    """The spec's stages in pipeline order, indexable by StageKind. `routing` (default: uniform)
    is what expert-parallel costs assume; it never changes what a stage computes."""
    experts = ExpertParallelStage(spec, routing) if spec.expert_parallel else ExpertsStage(spec)
    return (EmbedStage(spec, experts), experts, OutputStage(spec, experts))


def stages_on(spec: DeploymentSpec, rank: int, routing: Routing | None = None) -> list[Stage]:
    """The stages `rank` runs, in pipeline order."""
    return [s for s in stages_of(spec, routing) if rank in s.ranks]


def rank_flops(spec: DeploymentSpec, tokens: int | None = None,
               routing: Routing | None = None) -> dict[int, float]:
    """FLOPs per rank for `tokens` tokens through every layer (default: one whole batch)."""
    t = spec.model.tokens if tokens is None else tokens
    out = {r: 0.0 for r in spec.ranks}
    for stage in stages_of(spec, routing):
        for layer in stage.layers():
            for r in stage.ranks:
                out[r] += stage.flops(t, r, layer)
    return out
