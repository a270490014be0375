"""What one rank measures in `pyengine generate`: an untimed warm-up generation, then the timed one,
every step's action times and, on the router's rank, which experts each micro-batch touched (the
weight bytes each expert GPU streamed follow from it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pyengine.core import provenance
from pyengine.core.progress import progress
from pyengine.core.spec import DeploymentSpec
from pyengine.execute.faults import Fault
from pyengine.execute.generate import Generator, StepRecord
from pyengine.execute.graphs import GraphMode
from pyengine.execute.launch import RankContext
from pyengine.execute.results import GenerateMeasurement, StepMeasurement
from pyengine.model.weights import SeededWeights, rank_read_bytes, rank_weights

WARMUP_TOKENS = 2
"""New tokens per warm-up generation: a prefill and one decode step (kernels compiled, buffers made)."""


@dataclass(frozen=True, slots=True)
class PackedPrompts:
    """Prompts as one tensor and their lengths: what travels to the rank processes. Pickled for a
    spawned process, every tensor becomes a shared-memory file descriptor, so 1,500 prompts sent
    one tensor each ran out of descriptors under the common limit of 1024; packed, they take one."""

    ids: torch.Tensor
    """Every prompt's int64 ids, one after the other (CPU)."""
    lengths: tuple[int, ...]

    @classmethod
    def of(cls, prompts) -> PackedPrompts:
        prompts = [p.reshape(-1).to(torch.int64).cpu() for p in prompts]
        return cls(torch.cat(prompts), tuple(int(p.numel()) for p in prompts))

    def unpack(self) -> list[torch.Tensor]:
        return list(torch.split(self.ids, list(self.lengths)))


@dataclass(frozen=True, slots=True)
class GenerateOptions:
    prompts: PackedPrompts
    """The prompts, one sequence each."""
    max_new_tokens: int
    warmup: int = 1
    seed: int = 0
    source: Any = None
    """A pyengine.model.weights.WeightSource; None: seeded by `seed`."""
    fault: Fault | None = None
    """Testing hook: kill or stall one rank at one action of a decode step."""
    show_progress: bool = False
    """Rank 0 draws a bar over the steps (on a terminal only: pyengine.core.progress)."""
    graphs: str = "auto"
    """CUDA graphs of the decode steps: auto | on | off (pyengine.execute.graphs)."""

    def weights(self):
        return self.source if self.source is not None else SeededWeights(self.seed)


def generate_rank(ctx: RankContext, spec: DeploymentSpec, opts: GenerateOptions) -> GenerateMeasurement:
    weights = rank_weights(spec, opts.weights(), ctx.rank, ctx.device)
    gen = Generator(spec, ctx.rank, ctx.transport, weights, ctx.device, on_action=ctx.on_action,
                    graphs=GraphMode(opts.graphs))
    prompts = opts.prompts.unpack()
    for _ in range(opts.warmup):
        gen.generate(prompts, min(WARMUP_TOKENS, opts.max_new_tokens), timed=False)
    gen.fault = opts.fault
    ctx.barrier()
    draw = opts.show_progress and ctx.rank == 0
    with progress(opts.max_new_tokens, "pyengine generate", enabled=draw) as advance:
        res = gen.generate(prompts, opts.max_new_tokens, keep_logits=True, on_step=advance)
    out = GenerateMeasurement(rank=ctx.rank, device=provenance.device_name(ctx.device),
                              steps=[_step(s, spec) for s in res.steps],
                              prompt_lengths=[int(p.numel()) for p in prompts],
                              read_bytes=rank_read_bytes(spec, opts.weights(), ctx.rank),
                              graphs=gen.graphs_reason)
    if ctx.rank == spec.stage("output").gpus[0]:
        out.sequences = [s.tolist() for s in res.sequences]
        out.first_logits = None if res.first_logits is None else res.first_logits.numpy()
    return out


def _step(s: StepRecord, spec: DeploymentSpec) -> StepMeasurement:
    touched = []
    for layer in range(spec.model.layers):
        row = []
        for mb in range(s.batch.micro_batches):
            ids = s.routes.get((layer, mb))
            # -1: a padding row of a static step (it chose no expert)
            row.append(tuple(sorted(e for e in torch.unique(ids).tolist() if e >= 0)) if ids is not None else ())
        touched.append(row)
    return StepMeasurement(s.seconds, s.tokens, s.batch.micro_batches,
                           sum(c.keys_read for c in s.batch.chunks), s.times, s.t0,
                           touched if s.routes else [])
