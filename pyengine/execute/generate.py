"""Greedy generation on one rank, a client of the step loop: prefill every prompt, then decode one
token per live sequence per step, every rank running its part of the same plans.

    gen = Generator(spec, rank, transport, weights, device)
    out = gen.generate(prompts, max_new_tokens)   # every rank: the same prompts; every rank gets the ids

The prefill is one plan of every prompt (the chunked prefill of the whole model: `micro_batches`
near-even chunks of the prompts' concatenated tokens, logits only for each prompt's last token).
Each decode step is a plan of one token per live sequence, which the step loop runs as a static,
bucketed decode step (pyengine.execute.decode_state): its groups ping-pong between the attention GPU
and the expert GPUs, layer by layer. The output rank draws the ids and broadcasts them to every rank
(all ranks need them: the attention rank embeds them, every rank must agree on which sequences are
live). A sequence stops at one of its end-of-sequence ids or after `max_new_tokens`; the next step
leaves it out, its slot a hole in the cache. The step loop (cache, static buffers, runtimes) is kept
while a generation fits it, so a steady step allocates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pyengine.core.spec import DeploymentSpec
from pyengine.execute.graphs import GraphMode
from pyengine.execute.results import ActionTime
from pyengine.execute.step_loop import NonFiniteLogits, StepLoop, StepOutput
from pyengine.execute.step_plan import SeqWork, StepPlan
from pyengine.model.batch import Batch


@dataclass(slots=True)
class StepRecord:
    """One forward of the generation (the prefill, or a decode step), as this rank saw it."""

    seconds: float
    """Wall time from its start to the new ids known on this rank's host."""
    tokens: int
    """New tokens it produced (one per live sequence)."""
    batch: Batch
    times: list[ActionTime] = field(default_factory=list)
    t0: float = 0.0
    routes: dict = field(default_factory=dict)
    """(layer, micro-batch) -> top-k expert ids [t, k] (the router's rank only; -1: no expert)."""


@dataclass(slots=True)
class GenerateResult:
    sequences: list[torch.Tensor]
    """Per prompt: the prompt, then its new ids (int64, CPU)."""
    steps: list[StepRecord]
    """steps[0] is the prefill (its seconds: the time to first token), then one per decode step."""
    first_logits: torch.Tensor | None = None
    """The first sequence's logits of every step it took part in [steps, V] (output rank only)."""


class Generator:
    def __init__(self, spec: DeploymentSpec, rank: int, transport, weights: dict, device: torch.device,
                 *, on_action: Callable[[str, bool], None] | None = None, graphs: GraphMode = GraphMode.AUTO):
        if not spec.model.layered:
            raise ValueError("generation needs a model of layers (model.num_layers): the attention-free "
                             "block has no sequence to continue")
        self.spec, self.rank, self.transport, self.weights, self.device = spec, rank, transport, weights, device
        self.on_action, self.graphs = on_action, graphs
        self.eos = set(spec.model.eos_token_ids or ())
        self._loop: StepLoop | None = None
        self.fault = None
        """Testing hook (pyengine.execute.faults.Fault): fires in the decode steps only."""

    def generate(self, prompts: Sequence[torch.Tensor], max_new_tokens: int, *, timed: bool = True,
                 keep_logits: bool = False, on_step=None) -> GenerateResult:
        """`on_step()`: called after the prefill and after every decode step (a progress bar)."""
        on_step = on_step or (lambda: None)
        prompts = [p.reshape(-1).to(torch.int64).cpu() for p in prompts]
        lengths = [int(p.numel()) for p in prompts]
        loop = self._loop_for(len(prompts), max(lengths) + max_new_tokens)
        loop.fault = None
        new: list[list[int]] = [[] for _ in prompts]
        first_logits: list[torch.Tensor] = []
        plan = StepPlan(tuple(SeqWork(i, tuple(p.tolist()), 0) for i, p in enumerate(prompts)))
        steps = [self._step(loop, plan, new, first_logits, timed, keep_logits)]
        on_step()
        loop.fault = self.fault
        live = self._still_live(range(len(prompts)), new, max_new_tokens)
        while live:
            plan = StepPlan(tuple(SeqWork(s, (new[s][-1],), lengths[s] + len(new[s]) - 1) for s in live))
            steps.append(self._step(loop, plan, new, first_logits, timed, keep_logits))
            on_step()
            live = self._still_live(live, new, max_new_tokens)
        seqs = [torch.cat([p, torch.tensor(n, dtype=torch.int64)]) for p, n in zip(prompts, new)]
        logits = torch.stack(first_logits) if first_logits else None
        return GenerateResult(seqs, steps, logits)

    def _step(self, loop: StepLoop, plan: StepPlan, new: list[list[int]], first_logits: list, timed: bool,
              keep_logits: bool) -> StepRecord:
        try:
            out: StepOutput = loop.run(plan, timed=timed, keep_logits=keep_logits and plan.work[0].slot == 0)
        except NonFiniteLogits as e:  # the loop knows slots; the generation knows which step it was
            raise NonFiniteLogits(e.slots, step=len(new[plan.work[0].slot])) from None
        for w, token in zip(plan.sampled, out.ids):
            new[w.slot].append(token)
        if out.logits is not None:
            first_logits.append(out.logits)
        return StepRecord(out.seconds, len(plan.sampled), out.batch, out.times, out.t0, out.routes)

    def _still_live(self, live, new: list[list[int]], max_new_tokens: int) -> list[int]:
        return [s for s in live if len(new[s]) < max_new_tokens and new[s][-1] not in self.eos]

    @property
    def graphs_reason(self) -> str:
        """What the decode steps ran as (captured, or eager and why); empty before a generation."""
        return self._loop.graphs_reason if self._loop is not None else ""

    def _loop_for(self, sequences: int, capacity: int) -> StepLoop:
        """The step loop (kept while its cache holds this generation; every slot freed for it)."""
        if self._loop is None or sequences > self._loop.slots or capacity > self._loop.capacity:
            self._loop = StepLoop(self.spec, self.rank, self.transport, self.weights, self.device,
                                  slots=sequences, capacity=capacity, on_action=self.on_action,
                                  graphs=self.graphs)
        self._loop.reset()
        return self._loop
