"""Greedy generation on one rank: prefill every prompt, then decode one token per live sequence per
step, every rank running its part of the same schedule tables, over one KV cache.

    gen = Generator(spec, rank, transport, weights, device)
    out = gen.generate(prompts, max_new_tokens)   # every rank: the same prompts; every rank gets the ids

Prefill is the chunked prefill of the whole model (a Batch of the prompts' lengths, logits only
for each prompt's last token). Each decode step is a Batch of one token per live sequence,
grouped into near-even micro-batches (groups of sequences) that ping-pong between the attention
GPU and the expert GPUs, layer by layer. The output rank takes the argmax and broadcasts the new
ids to every rank (all ranks need them: the attention rank embeds them, every rank must agree on
which sequences are still live). A sequence stops at one of its end-of-sequence ids or after
`max_new_tokens`; the next step drops it. The KV cache is allocated once, for prompt + new tokens
of every sequence; decode runtimes (one per group count, the tables of a step never change while
the live set keeps its size) and their receive buffers are kept, so a steady step allocates nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from pyengine.core.dtypes import torch_dtype
from pyengine.core.spec import DeploymentSpec
from pyengine.execute.results import ActionTime
from pyengine.execute.runtime import RankRuntime
from pyengine.model.batch import Batch
from pyengine.transport.base import complete


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
    """(layer, micro-batch) -> top-k expert ids [t, k] (the router's rank only)."""


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
                 *, on_action: Callable[[str, bool], None] | None = None):
        if not spec.model.layered:
            raise ValueError("generation needs a model of layers (model.num_layers): the attention-free "
                             "block has no sequence to continue")
        self.spec, self.rank, self.transport, self.weights, self.device = spec, rank, transport, weights, device
        self.on_action = on_action or (lambda action, waiting: None)
        self.out_rank = spec.stage("output").gpus[0]
        self.group = tuple(range(spec.world_size))
        self.eos = set(spec.model.eos_token_ids or ())
        self._decode: dict[int, RankRuntime] = {}
        self._cache = None
        self.fault = None
        """Testing hook (pyengine.execute.faults.Fault): fires in the decode runtimes only."""

    # ---- public ----------------------------------------------------------------------------
    def generate(self, prompts: Sequence[torch.Tensor], max_new_tokens: int, *, timed: bool = True,
                 keep_logits: bool = False, on_step=None) -> GenerateResult:
        """`on_step()`: called after the prefill and after every decode step (a progress bar)."""
        on_step = on_step or (lambda: None)
        prompts = [p.reshape(-1).to(torch.int64).cpu() for p in prompts]
        lengths = [int(p.numel()) for p in prompts]
        cache = self._cache_for(len(prompts), max(lengths) + max_new_tokens)
        new: list[list[int]] = [[] for _ in prompts]
        first_logits: list[torch.Tensor] = []
        steps = []
        prefill = Batch.prefill(lengths, min(self.spec.schedule.micro_batches, sum(lengths)), logits_all=False)
        rt = RankRuntime(self.spec, self.rank, self.transport, self.weights, self.device, batch=prefill,
                         cache=cache, on_action=self.on_action)
        live = list(range(len(prompts)))
        steps.append(self._step(rt, prefill, torch.cat(prompts), live, new, first_logits, timed, keep_logits))
        on_step()
        live = self._still_live(live, new, max_new_tokens)
        while live:
            past = [lengths[s] + len(new[s]) - 1 for s in live]  # the last new id is not cached yet
            batch = Batch.decode(past, self.spec.schedule.micro_batches, slots=live)
            ids = torch.tensor([new[s][-1] for s in live], dtype=torch.int64)
            steps.append(self._step(self._runtime(batch, cache), batch, ids, live, new, first_logits,
                                    timed, keep_logits))
            on_step()
            live = self._still_live(live, new, max_new_tokens)
        seqs = [torch.cat([p, torch.tensor(n, dtype=torch.int64)]) for p, n in zip(prompts, new)]
        logits = torch.stack(first_logits) if first_logits else None
        return GenerateResult(seqs, steps, logits)

    # ---- one forward and its new ids ----------------------------------------------------------
    def _step(self, rt: RankRuntime, batch: Batch, ids: torch.Tensor, live: list[int], new: list[list[int]],
              first_logits: list, timed: bool, keep_logits: bool) -> StepRecord:
        t0 = time.perf_counter()
        res = rt.forward(ids, timed=timed, batch=batch)
        picked = torch.empty(len(live), dtype=torch.int64, device=self.transport.device)
        if res.logits is not None:  # the output rank: one row per live sequence, in order
            picked.copy_(res.logits.argmax(dim=-1))
            if keep_logits and live[0] == 0:
                first_logits.append(res.logits[0].float().cpu())  # intended sync: kept logits (checks)
        self.on_action("generate: new ids", True)
        complete([self.transport.broadcast(picked, self.out_rank, self.group, name="generate.ids")],
                 self.spec.comm.timeout_s)
        for s, token in zip(live, picked.tolist()):  # intended sync: the host decides who stops
            new[s].append(int(token))
        self.on_action("generate", False)
        record = StepRecord(time.perf_counter() - t0, len(live), batch, res.times, res.t0, dict(rt.routes))
        rt.routes.clear()
        return record

    def _still_live(self, live: list[int], new: list[list[int]], max_new_tokens: int) -> list[int]:
        return [s for s in live if len(new[s]) < max_new_tokens and new[s][-1] not in self.eos]

    # ---- state kept across steps -------------------------------------------------------------
    def _cache_for(self, sequences: int, capacity: int):
        """The attention rank's KV cache (kept while it is large enough); None elsewhere."""
        attends = any(st.attends and self.rank in st.ranks for st in _stages(self.spec))
        if not attends:
            return None
        if self._cache is None or not self._cache.fits(sequences, capacity):
            from pyengine.model.kv_cache import KVCache

            self._cache = KVCache(self.spec, sequences, capacity, self.device,
                                  torch_dtype(self.spec.model.dtype))
            self._decode.clear()
        return self._cache

    def _runtime(self, batch: Batch, cache) -> RankRuntime:
        """The decode runtime for this many groups (its tables fit every step of that size)."""
        m = batch.micro_batches
        if m not in self._decode:
            self._decode[m] = RankRuntime(self.spec, self.rank, self.transport, self.weights, self.device,
                                          batch=batch, cache=cache, on_action=self.on_action)
        self._decode[m].fault = self.fault if self.fault is not None and self.fault.rank == self.rank else None
        return self._decode[m]


def _stages(spec: DeploymentSpec):
    from pyengine.model.stages import stages_of

    return stages_of(spec)
