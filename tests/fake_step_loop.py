"""A stand-in for pyengine.execute.step_loop.StepLoop in the serving tests: the same `run(plan)` and
`blocks`, over a tiny seeded model written here, so the scheduler, the session, the plan broadcast
and the HTTP server can be checked without the engine.

The model: the next id's logits are a function of every token cached for the slot (a decayed sum
of seeded embeddings plus a position vector, times a seeded head), so a token fed at the wrong
position, twice, or to the wrong slot changes every later id. `solo(prompt, params)` is the
reference: the same model run on that request alone, one token at a time, written without the
scheduler, the plan or the block allocator.

Its allocator mimics the step loop's: fixed-size blocks, a table per slot, the lowest free blocks
first, a slot's blocks freed by plan.release; it raises when a plan asks for more than is free
(the scheduler's reservation must prevent that) and when a plan feeds a slot at a position other
than the number of tokens it already holds.
"""

from __future__ import annotations

import time

import torch

from pyengine.model.sampling import pack_sampling, sample

DECAY = 0.7


class FakeBlocks:
    def __init__(self, total: int, block_size: int):
        self.total, self.block_size = total, block_size
        self._free = list(range(total))
        self.tables: dict[int, list[int]] = {}
        self.history: list[tuple[int, tuple[int, ...]]] = []
        """(slot, its block table) for every sequence released, in order."""

    @property
    def free(self) -> int:
        return len(self._free)

    @property
    def used(self) -> int:
        return self.total - len(self._free)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def ensure(self, slot: int, tokens: int) -> None:
        table = self.tables.setdefault(slot, [])
        need = self.blocks_for(tokens) - len(table)
        if need > len(self._free):
            raise RuntimeError(f"slot {slot} needs {need} more blocks; {len(self._free)} free")
        for _ in range(max(0, need)):
            table.append(self._free.pop(0))
        self._free.sort()

    def release(self, slot: int) -> None:
        table = self.tables.pop(slot, [])
        self.history.append((slot, tuple(table)))
        self._free = sorted(self._free + table)


class TinyModel:
    def __init__(self, vocab: int = 29, hidden: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.vocab = vocab
        self.embed = torch.randn(vocab, hidden, generator=g, dtype=torch.float64)
        self.pos = torch.randn(64, hidden, generator=g, dtype=torch.float64)
        self.head = torch.randn(hidden, vocab, generator=g, dtype=torch.float64) * 2

    def logits(self, tokens: list[int]) -> torch.Tensor:
        weights = torch.tensor([DECAY ** (len(tokens) - 1 - j) for j in range(len(tokens))], dtype=torch.float64)
        h = (weights[:, None] * self.embed[torch.tensor(tokens)]).sum(0) + self.pos[len(tokens) % 64]
        return (h @ self.head).float()

    def solo(self, prompt, params, stop_ids=()) -> list[int]:
        """The request alone: one id at a time from the whole sequence so far."""
        tokens, out = list(prompt), []
        stops = set(stop_ids) | set(params.stop_token_ids)
        while len(out) < params.max_new_tokens:
            s = params.sampling
            rows = pack_sampling([(s, len(out))], "cpu")
            token = int(sample(self.logits(tokens)[None], *rows)[0])
            out.append(token)
            tokens.append(token)
            if token in stops:
                break
        return out


class FakeStepLoop:
    def __init__(self, model: TinyModel, *, blocks: int = 64, block_size: int = 4, slots: int = 8,
                 delay_s: float = 0.0, fail_at_step: int | None = None):
        """`delay_s`: each step sleeps this long (a slower engine); `fail_at_step`: that step raises
        (a rank that dies under the server)."""
        self.model, self.slots = model, slots
        self.blocks = FakeBlocks(blocks, block_size)
        self.cache: dict[int, list[int]] = {}
        self.plans: list = []
        self.delay_s, self.fail_at_step = delay_s, fail_at_step

    def run(self, plan) -> list[int]:
        if self.fail_at_step is not None and len(self.plans) >= self.fail_at_step:
            raise RuntimeError(f"fake step loop: planted failure at step {len(self.plans)}")
        if self.delay_s:
            time.sleep(self.delay_s)
        self.plans.append(plan)
        for slot in plan.release:
            self.blocks.release(slot)
            self.cache.pop(slot, None)
        for w in plan.work:
            if not 0 <= w.slot < self.slots:
                raise RuntimeError(f"slot {w.slot} outside [0, {self.slots})")
            cached = self.cache.setdefault(w.slot, [])
            if w.past != len(cached):
                raise RuntimeError(f"slot {w.slot} fed at position {w.past}; it holds {len(cached)} tokens")
            self.blocks.ensure(w.slot, w.past + len(w.tokens))
            cached.extend(w.tokens)
        sampled = plan.sampled
        if not sampled:
            return []
        logits = torch.stack([self.model.logits(self.cache[w.slot]) for w in sampled])
        ids = sample(logits, *pack_sampling([(w.sampling, w.index) for w in sampled], "cpu"))
        return [int(t) for t in ids]


def fake_setup(ctx, *, vocab: int = 40, blocks: int = 64, block_size: int = 4, slots: int = 8,
               step_tokens: int = 16, max_positions: int | None = 64, stop_ids=(), delay_s: float = 0.0,
               fail_at_step: int | None = None, fail_rank: int | None = None):
    """pyengine.serve.runner's make_loop for the tests: a FakeStepLoop per rank (the same model on
    every rank); `fail_rank` (with fail_at_step) is the rank whose loop fails."""
    from pyengine.serve.runner import LoopSetup
    from pyengine.serve.scheduler import Limits

    fails = fail_at_step if fail_rank is None or fail_rank == ctx.rank else None
    loop = FakeStepLoop(TinyModel(vocab), blocks=blocks, block_size=block_size, slots=slots, delay_s=delay_s,
                        fail_at_step=fails)
    limits = Limits(slots=slots, blocks=blocks, block_size=block_size, step_tokens=step_tokens,
                    max_positions=max_positions, vocab_size=vocab)
    return LoopSetup(loop, limits, tuple(stop_ids), kv_blocks_used=lambda: loop.blocks.used)
