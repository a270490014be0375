"""The serving runner started in-process for the HTTP tests: three virtual ranks (threads, the local
transport) running pyengine.serve.runner.serve_rank over fake step loops (tests/fake_step_loop.py),
the scheduling rank serving HTTP on a free loopback port."""

from __future__ import annotations

import functools
import multiprocessing as mp
import queue
import threading

from fake_step_loop import fake_setup


class InProcessServer:
    def __init__(self, folder, *, world: int = 3, grace_s: float = 10.0, **fake):
        from pyengine.serve.runner import ServeOptions

        self.drain = mp.get_context("spawn").Event()
        started: queue.Queue = queue.Queue()
        self.opts = ServeOptions(make_loop=functools.partial(fake_setup, **fake), host="127.0.0.1", port=0,
                                 model="tiny", tokenizer_dir=None if folder is None else str(folder),
                                 grace_s=grace_s, timeout_s=20.0, drain=self.drain, beat_s=0.2,
                                 on_started=started.put)
        self.world = world
        self.outcome: list | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        try:
            self.running = started.get(timeout=60)
        except queue.Empty:
            raise RuntimeError(f"the server did not start: {self.error}") from None
        self.url = f"http://127.0.0.1:{self.running.http.port}"

    def _run(self) -> None:
        from pyengine.execute.launch import Backend, bind, run_ranks
        from pyengine.serve.runner import serve_rank

        try:
            self.outcome = run_ranks(bind(serve_rank, self.opts), self.world, backend=Backend.LOCAL,
                                     groups=[tuple(range(self.world))], timeout_s=20.0, job_timeout_s=60.0)
        except BaseException as e:  # read by the test
            self.error = e

    @property
    def session(self):
        return self.running.frontend.session

    def client(self):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)

    def metric(self, name: str) -> float:
        import urllib.request

        text = urllib.request.urlopen(f"{self.url}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise KeyError(name)

    def stop(self, timeout_s: float = 60.0) -> None:
        self.drain.set()
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "the server did not stop"
