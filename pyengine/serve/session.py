"""Serving on one rank: requests in, steps of the step loop out, new ids back to their handles.

    session = Session(loop, limits, channel=PlanChannel(tr, root=0, ...), stop_ids=eos)
    # the scheduling rank (channel root):
    handle = session.submit([1, 2, 3], SamplingParams(max_new_tokens=4))
    while session.step(): ...       # or iterate the handle: it steps for you
    session.close()                 # tells the other ranks to stop
    # every other rank:
    session.follow()                # runs the root's plans until it closes

Only the scheduling rank holds a scheduler. Each of its steps sends exactly one message to the
other ranks (a plan, or IDLE when there is nothing to run) and then runs the plan on its own step
loop, so every rank runs the same plans in the same order and their block allocators agree.
`submit` and `abort` may be called from any thread: they queue what they ask and the stepping
thread applies it between steps, never inside one.
"""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from pyengine.core.errors import InputError
from pyengine.execute.step_plan import StepPlan
from pyengine.serve.channel import Kind, PlanChannel
from pyengine.serve.params import SamplingParams
from pyengine.serve.request import Finish, Request, RequestHandle
from pyengine.serve.scheduler import Limits, Scheduler


class StepLoopLike(Protocol):
    """What a session needs of the step loop (pyengine.execute.step_loop.StepLoop has it)."""

    def run(self, plan: StepPlan) -> list[int]: ...


class Observer(Protocol):
    """Hooks the HTTP server's metrics implement (called on the stepping thread)."""

    def submitted(self, handle: RequestHandle) -> None: ...

    def stepped(self, plan: StepPlan, seconds: float, new_ids: int) -> None: ...

    def token(self, handle: RequestHandle, at: float) -> None: ...

    def ended(self, handle: RequestHandle, finish: Finish) -> None: ...


@dataclass(frozen=True, slots=True)
class _Submit:
    request: Request
    handle: RequestHandle


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: int


class Closed(RuntimeError):
    """submit() after the session stopped admitting (the server is draining or has failed)."""


class Session:
    def __init__(self, loop: StepLoopLike, limits: Limits, *, channel: PlanChannel | None = None,
                 stop_ids: Sequence[int] = (), background: bool = False, observer: Observer | None = None,
                 on_action: Callable[[str, bool], None] | None = None):
        """`background`: a thread of the caller's steps the session (handles wait for it instead
        of stepping themselves)."""
        self.loop, self.limits, self.channel = loop, limits, channel
        self.scheduler = Scheduler(limits, stop_ids)
        self.background, self.observer = background, observer
        self.on_action = on_action or (lambda action, waiting: None)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._ids = itertools.count()
        self._handles: dict[int, RequestHandle] = {}
        self._admitting = True
        self._closed = False
        self.steps = 0
        self.failure = ""

    @property
    def scheduling(self) -> bool:
        return self.channel is None or self.channel.is_root

    # ---- the submitter's side (any thread) --------------------------------------------------------
    def submit(self, prompt_ids, params: SamplingParams | None = None, *, field: str = "prompt_ids",
               steps_field: str = "max_new_tokens") -> RequestHandle:
        """Queue a request; its handle yields its new ids. Refused (InputError naming the field)
        when the prompt is not ids inside the vocabulary or the request could never fit."""
        if not self.scheduling:
            raise InputError("submit", f"rank {self.channel.transport.rank}",
                             f"requests go to the scheduling rank ({self.channel.root}); this rank follows its plans")
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise InputError("params", type(params).__name__, "must be a SamplingParams")
        prompt = _prompt_tuple(prompt_ids, self.limits.vocab_size, field)
        if self.limits.vocab_size is not None:
            params.check_vocab(self.limits.vocab_size)
        self.limits.check(len(prompt), params.max_new_tokens, field=field, steps_field=steps_field)
        if not self._admitting:
            raise Closed(self.failure or "the server is shutting down: no new requests are admitted")
        rid = next(self._ids)
        handle = RequestHandle(rid, len(prompt), None if self.background else self._pump)
        handle._abort = lambda: self._post(_Abort(rid))
        model_stops = frozenset() if params.ignore_eos else self.scheduler.model_stop_ids
        stop = model_stops | frozenset(params.stop_token_ids)
        self._post(_Submit(Request(rid, prompt, params, stop), handle))
        return handle

    def abort(self, handle: RequestHandle) -> None:
        self._post(_Abort(handle.id))

    @property
    def admitting(self) -> bool:
        """Whether submit() accepts requests (False once draining, closed or failed)."""
        return self._admitting

    def stop_admitting(self, why: str = "") -> None:
        self._admitting = False
        if why:
            self.failure = why

    def _post(self, item) -> None:
        self._inbox.put(item)
        self._wake.set()

    def _pump(self) -> bool:
        """One step for a handle iterated in manual mode: whether a plan ran."""
        before = self.steps
        self.step()
        return self.steps > before

    # ---- the stepping thread -----------------------------------------------------------------------
    def has_work(self) -> bool:
        return not self._inbox.empty() or not self.scheduler.idle

    def wait_for_work(self, timeout_s: float) -> bool:
        """Block until a submit or abort arrives (or timeout_s); True when there is work."""
        if self.has_work():
            return True
        self._wake.wait(timeout_s)
        self._wake.clear()
        return self.has_work()

    def step(self) -> bool:
        """Root: one step (or one IDLE message when there is nothing to run); follower: run the
        root's next message. Returns whether anything is left (root) / whether to go on
        (follower: False once the root closed)."""
        if not self.scheduling:
            return self._follow_one()
        self._apply_inbox()
        plan = self.scheduler.schedule()
        if plan is None:
            self.on_action("serve: idle", False)  # progress for the launcher's watch
            if self.channel is not None:
                self.channel.send(Kind.IDLE)
            self._publish_finished()
            return False
        if self.channel is not None:
            self.on_action("serve: plan to the ranks", True)
            self.channel.send(Kind.PLAN, plan)
        self._run(plan)
        return not self.scheduler.idle or not self._inbox.empty()

    def _run(self, plan: StepPlan) -> None:
        t0 = time.monotonic()
        self.on_action("serve: step", False)
        try:
            ids = self.loop.run(plan)
        except BaseException as e:
            self.fail(f"the engine failed: {type(e).__name__}: {_first_line(e)}")
            raise
        self.steps += 1
        now = time.monotonic()
        pairs = self.scheduler.commit(plan, ids)
        for req, token in pairs:
            handle = self._handles[req.id]
            handle.publish(token, None)
            if self.observer is not None:
                self.observer.token(handle, now)
        if self.observer is not None:
            self.observer.stepped(plan, now - t0, len(pairs))
        self._publish_finished()

    def _apply_inbox(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Submit):
                self._handles[item.request.id] = item.handle
                self.scheduler.add(item.request)
                if self.observer is not None:
                    self.observer.submitted(item.handle)
            elif item.request_id in self._handles:
                self.scheduler.abort(item.request_id)

    def _publish_finished(self) -> None:
        for req in self.scheduler.take_finished():
            handle = self._handles.pop(req.id)
            handle.publish(None, req.finish, req.error)
            if self.observer is not None:
                self.observer.ended(handle, req.finish)

    def abort_all(self, why: str = "") -> None:
        """End every request now (waiting and running), telling its client `why`; their slots go
        back with the next plan."""
        self._apply_inbox()
        for req in [*self.scheduler.waiting, *self.scheduler.running]:
            req.error = why
            self.scheduler.abort(req.id)
        self._publish_finished()

    def fail(self, why: str) -> None:
        """The engine cannot go on: every request ends FAILED with `why`; nothing more is admitted."""
        self.stop_admitting(why)
        self._apply_inbox()
        for req in [*self.scheduler.waiting, *self.scheduler.running]:
            self.scheduler.abort(req.id)
        self.scheduler.take_finished()
        for handle in list(self._handles.values()):
            handle.publish(None, Finish.FAILED, why)
            if self.observer is not None:
                self.observer.ended(handle, Finish.FAILED)
        self._handles.clear()

    def close(self) -> None:
        """Root: tell the followers to stop (once); what is still live is aborted first."""
        self.stop_admitting()
        if self._closed:
            return
        self._closed = True
        if self.scheduling:
            self.abort_all("the server stopped before the request finished")
            if self.channel is not None:
                self.channel.send(Kind.STOP)

    # ---- followers ---------------------------------------------------------------------------------
    def _follow_one(self) -> bool:
        self.on_action("serve: waiting for the next plan", True)
        message = self.channel.receive()
        if message.kind is Kind.STOP:
            return False
        if message.kind is Kind.PLAN:
            self.on_action("serve: step", False)
            self.loop.run(message.plan)
            self.steps += 1
        return True

    def follow(self) -> None:
        """Follower: run the root's plans until it closes."""
        while self._follow_one():
            pass


def _prompt_tuple(prompt_ids, vocab_size: int | None, field: str) -> tuple[int, ...]:
    import numbers

    import torch

    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.dim() != 1 or prompt_ids.is_floating_point() or prompt_ids.is_complex():
            raise InputError(field, f"a {prompt_ids.dtype} tensor of shape {list(prompt_ids.shape)}",
                             "must be a 1-D tensor of integer token ids")
        prompt_ids = prompt_ids.tolist()
    if isinstance(prompt_ids, (str, bytes)) or not hasattr(prompt_ids, "__iter__"):
        raise InputError(field, prompt_ids, "must be a list of token ids")
    ids = list(prompt_ids)
    if not ids:
        raise InputError(field, [], "needs at least one token id")
    for i, token in enumerate(ids):
        if not isinstance(token, numbers.Integral) or isinstance(token, bool):
            raise InputError(f"{field}[{i}]", token, "must be an integer token id")
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            raise InputError(f"{field}[{i}]", token, f"must be in [0, {vocab_size}) (the vocabulary)")
    return tuple(int(t) for t in ids)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""
