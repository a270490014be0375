"""The server's Prometheus metrics (text format at /metrics), fed by the session's observer hooks.

Gauges are read when scraped (requests running and waiting, KV blocks used by the step loop's
allocator and reserved by the scheduler), so they are never stale; latencies are histograms:
time to first token (submission to the first new id on the host) and inter-token latency (between
a request's consecutive ids).
"""

from __future__ import annotations

import collections
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyengine.execute.step_plan import StepPlan
    from pyengine.serve.request import Finish, RequestHandle
    from pyengine.serve.session import Session

LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_WINDOW_S = 10.0
"""Tokens per second are averaged over this many trailing seconds."""


class ServeMetrics:
    """A session observer that keeps its own registry (several servers in one process never mix)."""

    def __init__(self, session: Session | None = None, kv_blocks_used=None):
        """`kv_blocks_used()`: blocks the step loop's allocator holds now (None: not known)."""
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = reg = CollectorRegistry()
        self.ttft = Histogram("pyengine_time_to_first_token_seconds", "Submission to first new id",
                              buckets=LATENCY_BUCKETS_S, registry=reg)
        self.itl = Histogram("pyengine_inter_token_latency_seconds", "Between a request's consecutive ids",
                             buckets=LATENCY_BUCKETS_S, registry=reg)
        self.tokens = Counter("pyengine_generation_tokens", "New ids drawn", registry=reg)
        self.prompt_tokens = Counter("pyengine_prompt_tokens", "Prompt tokens submitted", registry=reg)
        self.steps = Counter("pyengine_steps", "Steps of the step loop run", registry=reg)
        self.finished = Counter("pyengine_requests_finished", "Requests ended, by reason", ["reason"],
                                registry=reg)
        from pyengine.serve.request import Finish

        for reason in Finish:  # every series from the start (a scrape sees 0, not a missing series)
            self.finished.labels(reason=reason.value)
        self.rate = Gauge("pyengine_tokens_per_second", f"New ids per second over the last {RATE_WINDOW_S:g} s",
                          registry=reg)
        self.rate.set_function(self.tokens_per_second)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()
        self._last: dict[int, float] = {}
        if session is not None:
            self._session_gauges(session, kv_blocks_used)

    def _session_gauges(self, session: Session, kv_blocks_used) -> None:
        from prometheus_client import Gauge

        sched, reg = session.scheduler, self.registry
        Gauge("pyengine_requests_running", "Admitted requests (prefilling or decoding)",
              registry=reg).set_function(lambda: len(sched.running))
        Gauge("pyengine_requests_waiting", "Requests waiting for a slot and KV blocks",
              registry=reg).set_function(lambda: len(sched.waiting))
        Gauge("pyengine_kv_blocks_total", "KV blocks in the cache", registry=reg).set(session.limits.blocks)
        Gauge("pyengine_kv_blocks_reserved", "KV blocks reserved by admitted requests",
              registry=reg).set_function(lambda: sched.reserved)
        if kv_blocks_used is not None:
            Gauge("pyengine_kv_blocks_used", "KV blocks the step loop's allocator holds",
                  registry=reg).set_function(kv_blocks_used)

    # ---- observer hooks (the stepping thread) --------------------------------------------------------
    def submitted(self, handle: RequestHandle) -> None:
        self.prompt_tokens.inc(handle.prompt_tokens)

    def token(self, handle: RequestHandle, at: float) -> None:
        last = self._last.get(handle.id)
        if last is None:
            self.ttft.observe(at - handle.submitted_at)
        else:
            self.itl.observe(at - last)
        self._last[handle.id] = at

    def stepped(self, plan: StepPlan, seconds: float, new_ids: int) -> None:
        self.steps.inc()
        self.tokens.inc(new_ids)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, new_ids))
            self._trim(now)

    def ended(self, handle: RequestHandle, finish: Finish) -> None:
        self._last.pop(handle.id, None)
        self.finished.labels(reason=finish.value).inc()

    # ---- reading --------------------------------------------------------------------------------------
    def _trim(self, now: float) -> None:
        while self._recent and now - self._recent[0][0] > RATE_WINDOW_S:
            self._recent.popleft()

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        with self._lock:
            self._trim(now)
            return sum(n for _, n in self._recent) / RATE_WINDOW_S

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)
