"""Continuous batching on the scheduling rank: which requests run each step, and what each feeds.

    sched = Scheduler(limits, stop_ids=spec.model.eos_token_ids)
    sched.add(request); plan = sched.schedule(); ids = loop.run(plan); sched.commit(plan, ids)

Policy (a pure function of the submissions, their order and the ids drawn, so a replay gives the
same plans):

* **Admission reserves the whole request.** A waiting request is admitted, first come first
  served, when a slot is free and the KV blocks of prompt + max_new_tokens fit beside every
  admitted request's reservation; it then never waits for memory again, so there is no
  preemption and no recomputation. The head of the queue blocks the ones behind it (no
  overtaking: a long request is not starved by short ones). A request whose reservation exceeds
  the whole cache is refused at submission (Limits.check).
* **Each step spends a token budget** (Sarathi-Serve's stall-free batching): first one decode
  token for every running request, then prefill chunks of admitted requests in admission order,
  each as much of its prompt as the budget has left, then newly admitted requests' first chunks.
  A prompt's last chunk draws its first new id; earlier chunks draw nothing.
* **A finished request frees at once**: its slot and reservation return to the scheduler when
  its last id is committed, and its slot is in the next plan's `release`, so the step loop frees
  its blocks before that step's work (which may already reuse the slot).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from pyengine.core.errors import InputError
from pyengine.execute.step_plan import SeqWork, StepPlan
from pyengine.serve.request import Finish, Request


@dataclass(frozen=True, slots=True)
class Limits:
    """The capacity the scheduler plans within (the step loop's, on every rank alike)."""

    slots: int
    """Sequences in the KV cache at once (rows of its block table)."""
    blocks: int
    """KV blocks in the whole cache."""
    block_size: int
    """Tokens per KV block."""
    step_tokens: int
    """Tokens one step feeds at most (decode tokens and prefill chunks together), >= slots."""
    max_positions: int | None = None
    """The model's longest sequence (None: no limit)."""
    vocab_size: int | None = None
    capacity: int | None = None
    """Tokens one sequence may hold in the KV cache (its block table's length; None: no limit)."""

    def __post_init__(self) -> None:
        from pyengine.core.limits import MAX_INT, check_number

        for name in ("slots", "blocks", "block_size", "step_tokens"):
            check_number(name, getattr(self, name), lo=1, hi=MAX_INT, integer=True)
        if self.step_tokens < self.slots:
            raise InputError("step_tokens", self.step_tokens,
                             f"must be >= slots ({self.slots}): every running request decodes each step")

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def check(self, prompt_tokens: int, max_new_tokens: int, *, field: str = "prompt",
              steps_field: str = "max_new_tokens") -> None:
        """Refuse a request that could never run: beyond the model's positions or the whole cache."""
        total = prompt_tokens + max_new_tokens
        if self.max_positions is not None and total > self.max_positions:
            raise InputError(field, prompt_tokens, f"tokens + {steps_field} {max_new_tokens} = {total} exceed "
                                                   f"the model's {self.max_positions} positions")
        if self.capacity is not None and total > self.capacity:
            raise InputError(field, prompt_tokens, f"tokens + {steps_field} {max_new_tokens} = {total} exceed "
                                                   f"the {self.capacity} tokens a sequence may hold in this "
                                                   "server's KV cache")
        need = self.blocks_for(total)
        if need > self.blocks:
            raise InputError(field, prompt_tokens, f"tokens + {steps_field} {max_new_tokens} = {total} need "
                                                   f"{need} KV blocks of {self.block_size} tokens; the whole "
                                                   f"KV cache has {self.blocks}")


class Scheduler:
    def __init__(self, limits: Limits, stop_ids: Sequence[int] = ()):
        self.limits = limits
        self.model_stop_ids = frozenset(int(t) for t in stop_ids)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        """Admitted requests in admission order (prefilling or decoding)."""
        self.free_slots = list(range(limits.slots))
        self.reserved = 0
        """KV blocks reserved by the admitted requests."""
        self._release: list[int] = []
        self.finished: list[Request] = []
        """Requests ended by the last commit or abort (the session publishes and clears them)."""

    # ---- inputs ---------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        self.waiting.append(request)

    def abort(self, request_id: int) -> None:
        """End a request now (waiting: dropped; running: its slot freed with the next plan)."""
        for req in self.waiting:
            if req.id == request_id:
                self.waiting.remove(req)
                req.finish = Finish.ABORT
                self.finished.append(req)
                return
        for req in self.running:
            if req.id == request_id:
                self._end(req, Finish.ABORT)
                return

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running and not self._release

    # ---- one step ----------------------------------------------------------------------------------
    def schedule(self) -> StepPlan | None:
        """The next step's plan, or None when there is nothing to run or release."""
        budget = self.limits.step_tokens
        work: list[SeqWork] = []
        for req in self.running:  # decodes first: a running request never stalls
            if not req.prefilling:
                work.append(SeqWork(req.slot, (req.out[-1],), req.cached, True, req.params.sampling,
                                    len(req.out)))
                budget -= 1
        for req in self.running:
            if req.prefilling and budget > 0:
                budget -= self._chunk(req, budget, work)
        while self.waiting and budget > 0 and self._admit(self.waiting[0]):
            budget -= self._chunk(self.waiting.popleft(), budget, work)
        release, self._release = tuple(self._release), []
        if not work and not release:
            return None
        return StepPlan(tuple(work), release)

    def _admit(self, req: Request) -> bool:
        need = self.limits.blocks_for(len(req.prompt) + req.params.max_new_tokens)
        if not self.free_slots or self.reserved + need > self.limits.blocks:
            return False
        req.slot = self.free_slots.pop(0)  # the lowest free slot: plans are a function of the inputs
        req.blocks = need
        self.reserved += need
        self.running.append(req)
        return True

    @staticmethod
    def _chunk(req: Request, budget: int, work: list[SeqWork]) -> int:
        tokens = req.prompt[req.fed:req.fed + budget]
        last = req.fed + len(tokens) == len(req.prompt)
        work.append(SeqWork(req.slot, tokens, req.fed, last, req.params.sampling, 0))
        return len(tokens)

    def commit(self, plan: StepPlan, ids: Sequence[int]) -> list[tuple[Request, int]]:
        """Apply a step's outcome (ids: one per plan.sampled, in order); returns the (request,
        new id) pairs in plan order. Requests that ended are in `finished`."""
        by_slot = {req.slot: req for req in self.running}
        if len(ids) != len(plan.sampled):
            raise RuntimeError(f"the step returned {len(ids)} ids for {len(plan.sampled)} sampled sequences")
        drawn = iter(ids)
        out = []
        for w in plan.work:  # aborts are applied between steps: every slot is still running
            req = by_slot[w.slot]
            if req.prefilling:
                req.fed += len(w.tokens)
            if not w.sample:
                continue
            token = int(next(drawn))
            req.out.append(token)
            out.append((req, token))
            why = req.finish_after(token)
            if why is not None:
                self._end(req, why)
        return out

    def _end(self, req: Request, why: Finish) -> None:
        req.finish = why
        self.running.remove(req)
        self.free_slots.append(req.slot)
        self.free_slots.sort()
        self.reserved -= req.blocks
        self._release.append(req.slot)
        self.finished.append(req)

    def take_finished(self) -> list[Request]:
        done, self.finished = self.finished, []
        return done
