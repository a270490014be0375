"""`pyengine.Engine` with requests: submit, step, follow (the engine of pyengine.execute plus serving).

    engine = pyengine.Engine(spec, transport, source=...)   # this class
    if rank == 0:                                           # the scheduling rank
        h = engine.submit(prompt_ids, SamplingParams(max_new_tokens=32, temperature=0.7, seed=1))
        for token in h: ...                                 # steps as needed (or call engine.step())
        engine.close_serving()                              # the other ranks' follow() returns
    else:
        engine.follow()                                     # run rank 0's plans until it closes

Serving keeps a step loop of its own (its paged KV cache sized by ServeCapacity, made at the first
submit/step/follow, after the same memory check generate makes); `generate` and `forward` work as
before. Every rank must build the same capacity (pass the same `start_serving(...)` everywhere).
"""

from __future__ import annotations

from pyengine.core.errors import InputError
from pyengine.execute.engine import Engine
from pyengine.serve.engine_loop import ServeCapacity, step_loop_setup
from pyengine.serve.params import SamplingParams
from pyengine.serve.request import RequestHandle
from pyengine.serve.session import Session


class _RankView:
    """What step_loop_setup reads of a launcher's rank context, from an Engine."""

    def __init__(self, engine: Engine, on_action):
        self.rank, self.transport, self.device = engine.rank, engine.transport, engine.device
        self.world_size = engine.spec.world_size
        self.on_action = on_action


class ServingEngine(Engine):
    _session: Session | None = None

    def start_serving(self, capacity: ServeCapacity | None = None, *, root: int = 0,
                      on_action=None) -> Session:
        """Build the serving step loop and session (every rank alike); idempotent once started."""
        from pyengine.serve.channel import PlanChannel

        if self._session is not None:
            return self._session
        capacity = capacity if capacity is not None else ServeCapacity()
        if not isinstance(capacity, ServeCapacity):
            raise InputError("capacity", type(capacity).__name__, "must be a ServeCapacity")
        if isinstance(root, bool) or not isinstance(root, int) or not 0 <= root < self.spec.world_size:
            raise InputError("root", root, f"must be a rank in [0, {self.spec.world_size})")
        tokens, _, _ = capacity.resolve(self.spec)
        self._check_kv_fits(capacity.slots, tokens)
        view = _RankView(self, on_action or (lambda action, waiting: None))
        setup = step_loop_setup(view, self.spec, capacity=capacity, weights=self.weights,
                                graphs=self.graphs)
        channel = PlanChannel(self.transport, root, self.spec.world_size, self.spec.comm.timeout_s)
        self._session = Session(setup.loop, setup.limits, channel=channel, stop_ids=setup.stop_ids,
                                on_action=view.on_action)
        return self._session

    def submit(self, prompt_ids, params: SamplingParams | None = None) -> RequestHandle:
        """Queue a request (the scheduling rank only); its handle yields the new ids."""
        return self.start_serving().submit(prompt_ids, params)

    def step(self) -> bool:
        """One step on every rank (each rank calls it the same number of times): the scheduling
        rank plans and broadcasts, the others run its plan. Scheduling rank: whether anything is
        left; other ranks: False once the scheduling rank closed."""
        return self.start_serving().step()

    def follow(self) -> None:
        """Other ranks: run the scheduling rank's plans until it calls close_serving()."""
        self.start_serving().follow()

    def close_serving(self) -> None:
        """Scheduling rank: abort what is left and release the followers."""
        if self._session is not None:
            self._session.close()
