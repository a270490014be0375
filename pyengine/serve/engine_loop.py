"""The engine's step loop as serving uses it, on one rank: built from the spec and the weights, sized
by the serving limits, and wrapped so that a session gets exactly the new ids of every plan.

    setup = step_loop_setup(ctx, spec, source=None, seed=0, capacity=ServeCapacity(slots=8, ...))

Every rank builds the same loop (the same slots, blocks and block size), so the block allocators
that replay the root's plans agree.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyengine.core.errors import InputError
from pyengine.execute.step_plan import StepPlan
from pyengine.serve.scheduler import Limits

DEFAULT_SLOTS = 8
DEFAULT_CAPACITY = 2048
"""Tokens per sequence when the model states no limit of its own."""


@dataclass(frozen=True, slots=True)
class ServeCapacity:
    """How big the serving KV cache is and how much one step feeds."""

    slots: int = DEFAULT_SLOTS
    """Sequences at once."""
    capacity: int | None = None
    """Tokens per sequence (prompt + new ids); None: the model's max_positions, else DEFAULT_CAPACITY."""
    blocks: int | None = None
    """KV blocks in all (None: enough for every slot at full capacity; fewer pages them)."""
    step_tokens: int | None = None
    """Tokens one step feeds at most (None: max(slots, 256))."""

    def resolve(self, spec) -> tuple[int, int | None, int]:
        """(capacity, blocks, step_tokens) for this model, each checked (InputError naming it)."""
        from pyengine.core.limits import MAX_INT, check_number

        check_number("slots", self.slots, lo=1, hi=MAX_INT, integer=True)
        model_max = spec.model.max_positions
        capacity = self.capacity if self.capacity is not None else (model_max or DEFAULT_CAPACITY)
        check_number("capacity", capacity, lo=2, hi=MAX_INT, integer=True)
        if model_max is not None and capacity > model_max:
            raise InputError("capacity", capacity, f"must be <= the model's {model_max} positions")
        if self.blocks is not None:
            from pyengine.model.kv_cache import BLOCK_SIZE

            # more blocks than every slot full can ever use are memory the fit check never priced
            # (it prices slots x capacity tokens): --kv-blocks 2**31-1 died allocating 824 GB on rank 0
            most = self.slots * -(-capacity // BLOCK_SIZE)
            check_number("blocks", self.blocks, lo=1, hi=most, integer=True,
                         why=f" (the most {self.slots} sequences of {capacity} tokens can use)")
        step_tokens = self.step_tokens if self.step_tokens is not None else max(self.slots, 256)
        check_number("step_tokens", step_tokens, lo=self.slots, hi=MAX_INT, integer=True)
        return capacity, self.blocks, step_tokens


class ServingLoop:
    """A StepLoop as a session drives it: run(plan) -> the new ids of plan.sampled (a plan with
    only slots to release runs no step)."""

    def __init__(self, loop):
        self.loop = loop
        self.blocks = loop.blocks
        self.total_blocks = loop.blocks.total

    def run(self, plan: StepPlan) -> list[int]:
        return self.loop.run(plan, timed=False).ids

    def blocks_used(self) -> int:
        return self.total_blocks - self.blocks.free


def step_loop_setup(ctx, spec, *, source=None, seed: int = 0, capacity: ServeCapacity = ServeCapacity(),
                    weights: dict | None = None, graphs=None):
    """This rank's serving step loop and the limits the scheduler plans within
    (pyengine.serve.runner's make_loop, with the first three bound). `graphs`: the step loop's
    GraphMode (None: its default)."""
    from pyengine.execute.step_loop import StepLoop
    from pyengine.model.kv_cache import BLOCK_SIZE
    from pyengine.model.weights import rank_weights
    from pyengine.serve.runner import LoopSetup

    tokens, blocks, step_tokens = capacity.resolve(spec)
    if weights is None:
        weights = rank_weights(spec, source if source is not None else seed, ctx.rank, ctx.device)
    extra = {} if graphs is None else {"graphs": graphs}
    loop = ServingLoop(StepLoop(spec, ctx.rank, ctx.transport, weights, ctx.device, slots=capacity.slots,
                                capacity=tokens, blocks=blocks, block_size=BLOCK_SIZE, on_action=ctx.on_action,
                                **extra))
    limits = Limits(slots=capacity.slots, blocks=loop.total_blocks, block_size=BLOCK_SIZE, step_tokens=step_tokens,
                    max_positions=spec.model.max_positions, vocab_size=spec.model.vocab_size, capacity=tokens)
    return LoopSetup(loop, limits, tuple(spec.model.eos_token_ids or ()), kv_blocks_used=loop.blocks_used)
