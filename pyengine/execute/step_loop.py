"""The engine's step loop on one rank: `run(plan)` runs one step of the schedule for everything live and
returns the new ids, the same on every rank. `generate` and `serve` are its clients.

    loop = StepLoop(spec, rank, transport, weights, device, slots=8, capacity=4096)
    out = loop.run(StepPlan(...))        # every rank, the same plan; out.ids on every rank

It owns what lives across steps: the paged KV cache (the attention rank's tensors; every rank keeps
the same block allocator, replaying the same plans, so the scheduling rank can ask it what fits),
the RoPE tables, the decode runtimes and their static buffers (one per decode shape), and the
prefill runtimes (one per chunk structure). A decode-only plan runs the static step of its shape
(pyengine.execute.decode_state); any other plan (a prefill chunk in it) runs eagerly over the same
cache. The output rank picks each sampled sequence's id on the device and broadcasts the ids; a
sequence whose logits are not finite gets -1 (a `NonFiniteLogits` error on every rank, naming it).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from pyengine.core.dtypes import torch_dtype
from pyengine.core.spec import DeploymentSpec
from pyengine.execute.decode_state import DecodeShape, StaticStep, decode_shape
from pyengine.execute.graphs import CudaGraphs, GraphDecision, GraphMode, SegmentGraphs, decide
from pyengine.execute.results import ActionTime
from pyengine.execute.runtime import RankRuntime
from pyengine.execute.step_plan import StepPlan
from pyengine.model.batch import Batch
from pyengine.model.kv_cache import BLOCK_SIZE, BlockAllocator, KVCache, blocks_for
from pyengine.model.ops import ops_for
from pyengine.transport.base import complete


EAGER_RUNTIMES = 16
"""Prefill runtimes kept (least recently used dropped): one per chunk structure."""


class NonFiniteLogits(RuntimeError):
    """A sequence's logits held NaN or inf: no id is drawn from them."""

    def __init__(self, slots: list[int], step: int | None = None):
        self.slots, self.step = slots, step
        where = "" if step is None else (" at the prefill (step 0)" if step == 0 else f" at decode step {step}")
        super().__init__(f"non-finite logits (NaN or inf){where} for the sequence(s) in KV slot(s) {slots}: "
                         "no id drawn from them (check the weights and the dtype's range)")


@dataclass(slots=True)
class StepOutput:
    ids: list[int]
    """The new id of each of `plan.sampled`, in order (every rank)."""
    seconds: float
    """Wall time from the step's start to the ids on this rank's host."""
    batch: Batch | None
    """The step's batch as the plan has it (no padding rows); None for a plan of releases only."""
    times: list[ActionTime] = field(default_factory=list)
    t0: float = 0.0
    routes: dict = field(default_factory=dict)
    """(layer, micro-batch) -> top-k expert ids [rows, k] (the router's rank only; -1: none)."""
    logits: torch.Tensor | None = None
    """The output rank's logits of the plan's first sequence [V] (when asked for and sampled)."""


class StepLoop:
    def __init__(self, spec: DeploymentSpec, rank: int, transport, weights: dict, device: torch.device, *,
                 slots: int, capacity: int, blocks: int | None = None, block_size: int = BLOCK_SIZE,
                 on_action: Callable[[str, bool], None] | None = None, graphs: GraphMode = GraphMode.AUTO,
                 graph_backend=None):
        """`graphs`: capture the decode steps (pyengine.execute.graphs; `graphs_reason` says what was
        decided and why). `graph_backend`: a testing hook (graphs.CheckedReplays on CPU)."""
        if not spec.model.layered:
            raise ValueError("the step loop needs a model of layers (model.num_layers): the attention-free "
                             "block has no sequence to continue")
        self.spec, self.rank, self.transport, self.weights, self.device = spec, rank, transport, weights, device
        self.on_action = on_action or (lambda action, waiting: None)
        self.out_rank = spec.stage("output").gpus[0]
        self.group = tuple(range(spec.world_size))
        self.attends = rank in spec.stage("embed").gpus
        self.ops = ops_for(spec, device)
        self.slots, self.capacity = slots, capacity
        self.cache = self.rope = None
        if self.attends:
            from pyengine.model.attention import RopeTables, fuse_qkv

            self.cache = KVCache(spec, slots, capacity, device, torch_dtype(spec.model.dtype),
                                 block_size=block_size, blocks=blocks)
            self.rope = RopeTables.for_model(spec.model, capacity, device)
            fuse_qkv(weights, range(spec.model.layers))
            self.blocks = self.cache.allocator
        else:
            max_blocks = blocks_for(capacity, block_size)
            self.blocks = BlockAllocator(slots * max_blocks if blocks is None else blocks, block_size, slots,
                                         max_blocks)
        decision = GraphDecision(True, "graph bookkeeping checked on the host") if graph_backend else \
            decide(GraphMode(graphs), device, self.ops)
        self.graphs_on, self._graph_reason, self._graph_backend = decision.enabled, decision.reason, graph_backend
        self.launches = None
        """A LaunchCounter (pyengine.execute.launches) given to every decode runtime, when set."""
        self._decode: dict[DecodeShape, tuple[RankRuntime, StaticStep]] = {}
        self._eager: OrderedDict[tuple, RankRuntime] = OrderedDict()
        self.fault = None
        """Testing hook (pyengine.execute.faults.Fault): fires in the decode runtimes only."""

    # ---- public ---------------------------------------------------------------------------------
    @property
    def graphs_reason(self) -> str:
        """What the decode steps run as: captured (and what), or eager and why."""
        failed = [rt.graphs.failed for rt, _ in self._decode.values() if rt.graphs is not None and rt.graphs.failed]
        return failed[0] if failed else self._graph_reason

    def run(self, plan: StepPlan, *, timed: bool = True, keep_logits: bool = False) -> StepOutput:
        t0 = time.perf_counter()
        for slot in plan.release:
            self.blocks.release(slot)
        self._check(plan)
        if not plan.work:  # only releases: nothing runs on any rank
            return StepOutput([], time.perf_counter() - t0, None)
        if plan.decode_only:
            rt, batch, res, rows = self._decode_step(plan, timed)
        else:
            rt, batch, res, rows = self._eager_step(plan, timed)
        logits = None
        ids = self._pick(res.logits, rows, plan)
        if keep_logits and res.logits is not None and plan.work[0].sample:
            logits = res.logits[rows[0]].float().cpu()  # intended sync: kept logits (checks)
        out = StepOutput(ids, time.perf_counter() - t0, batch, res.times, res.t0, dict(rt.routes), logits)
        rt.routes.clear()
        return out

    def reset(self) -> None:
        """Every slot's blocks released (a new batch of sequences starts)."""
        for slot in range(self.slots):
            self.blocks.release(slot)

    # ---- the two kinds of step ------------------------------------------------------------------
    def _check(self, plan: StepPlan) -> None:
        slots = [w.slot for w in plan.work]
        if len(set(slots)) != len(slots) or not all(0 <= s < self.slots for s in slots):
            raise ValueError(f"plan slots {slots}: distinct, each in [0, {self.slots})")
        for w in plan.work:
            if w.past + len(w.tokens) > self.capacity:
                raise ValueError(f"slot {w.slot}: {w.past + len(w.tokens)} tokens; the KV cache holds "
                                 f"{self.capacity} per sequence")

    def _grow(self, plan: StepPlan, rt: RankRuntime) -> None:
        lengths = {w.slot: w.past + len(w.tokens) for w in plan.work}
        if self.cache is None:
            for slot, n in lengths.items():
                self.blocks.grow(slot, n)
            return
        with rt.stream_context():  # the block table's update is ordered before the step's kernels
            self.cache.grow(lengths)

    def _eager_step(self, plan: StepPlan, timed: bool):
        batch = Batch(tuple(len(w.tokens) for w in plan.work), tuple(w.past for w in plan.work),
                      min(self.spec.schedule.micro_batches, sum(len(w.tokens) for w in plan.work)),
                      logits_all=False, slots=tuple(w.slot for w in plan.work))
        key = (batch.micro_batches, tuple(batch.kv_order()))
        if key in self._eager:
            self._eager.move_to_end(key)
        else:
            while len(self._eager) >= EAGER_RUNTIMES:  # a server meets ever new chunk structures
                self._eager.popitem(last=False)
            self._eager[key] = RankRuntime(self.spec, self.rank, self.transport, self.weights, self.device,
                                           batch=batch, cache=self.cache, on_action=self.on_action)
            self._eager[key].rope, self._eager[key].ops = self.rope, self.ops
        rt = self._eager[key]
        self._grow(plan, rt)
        ids = torch.tensor([t for w in plan.work for t in w.tokens], dtype=torch.int64)
        res = rt.forward(ids, timed=timed, batch=batch)
        return rt, batch, res, list(range(len(plan.work)))

    def _decode_step(self, plan: StepPlan, timed: bool):
        shape, sizes = decode_shape(len(plan.work), self.spec.schedule.micro_batches)
        batch = Batch.decode([w.past for w in plan.work], shape.groups, slots=[w.slot for w in plan.work])
        rt, state = self._static(shape)
        rt.fault = self.fault if self.fault is not None and self.fault.rank == self.rank else None
        self._grow(plan, rt)
        with rt.stream_context():
            state.write([w.tokens[0] for w in plan.work], [w.slot for w in plan.work],
                        [w.past for w in plan.work], sizes)
            tables = self._tables(state, plan, sizes) if self.attends else []
        res = rt.forward(state.ids, timed=timed, batch=shape.batch(), tables=tables)
        return rt, batch, res, state.rows_of

    def _static(self, shape: DecodeShape) -> tuple[RankRuntime, StaticStep]:
        if shape not in self._decode:
            rt = RankRuntime(self.spec, self.rank, self.transport, self.weights, self.device,
                             batch=shape.batch(), cache=self.cache, on_action=self.on_action)
            rt.rope, rt.ops = self.rope, self.ops
            if self.graphs_on:
                rt.graphs = SegmentGraphs(self._graph_backend or CudaGraphs(rt.stream))
            self._decode[shape] = (rt, StaticStep(shape, self.device))
        rt = self._decode[shape][0]
        rt.launches = self.launches
        return self._decode[shape]

    def _tables(self, state: StaticStep, plan: StepPlan, sizes: list[int]) -> list:
        """The attention rank's chunk tables of a static step, one per group (each group's longest
        sequence bounds the torch path's reads)."""
        dtype = torch_dtype(self.spec.model.dtype)
        out, at = [], 0
        for g, n in enumerate(sizes):
            longest = max(w.past for w in plan.work[at:at + n]) + 1
            out.append(self.ops.decode_tables(self.cache, self.rope, state.group_meta(g), dtype,
                                              blocks_for(longest, self.cache.block_size)))
            at += n
        return out

    # ---- new ids --------------------------------------------------------------------------------
    def _pick(self, logits: torch.Tensor | None, rows: list[int], plan: StepPlan) -> list[int]:
        """The output rank draws an id per row (-1 where the logits are not finite), broadcasts them;
        every rank keeps the sampled sequences' ids."""
        n = len(rows) if not plan.decode_only else self._decode_rows(plan)
        picked = torch.empty(n, dtype=torch.int64, device=self.transport.device)
        if logits is not None:
            picked.copy_(draw(logits, plan, rows))
        self.on_action("step: new ids", True)
        complete([self.transport.broadcast(picked, self.out_rank, self.group, name="step.ids")],
                 self.spec.comm.timeout_s)
        every = picked.tolist()  # intended sync: the host decides who stops
        self.on_action("step", False)
        ids = [every[rows[i]] for i, w in enumerate(plan.work) if w.sample]
        bad = [w.slot for w, i in zip(plan.sampled, ids) if i < 0]
        if bad:
            raise NonFiniteLogits(bad)
        return ids

    def _decode_rows(self, plan: StepPlan) -> int:
        shape, _ = decode_shape(len(plan.work), self.spec.schedule.micro_batches)
        return shape.total


def draw(logits: torch.Tensor, plan: StepPlan, rows: list[int]) -> torch.Tensor:
    """An id per logits row, on the device: greedy (argmax, ties to the lower id) unless a sampled
    sequence asks for sampling (pyengine.model.sampling); -1 where a row's logits are not finite."""
    if all(w.sampling.greedy for w in plan.sampled):
        ids = logits.argmax(dim=-1)
    else:
        from pyengine.model.sampling import sample_rows

        ids = sample_rows(logits, plan, rows)
    return torch.where(torch.isfinite(logits).all(dim=-1), ids, -1)
