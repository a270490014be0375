"""uvicorn on a thread of its own (the scheduling rank's process), started and stopped explicitly.

The event loop runs on this thread only; the engine steps on another, so no request handler ever
waits on a step. Signals are left to the process (uvicorn's own handlers are not installed: the
serve command decides what SIGTERM means).
"""

from __future__ import annotations

import threading
import time

STARTUP_TIMEOUT_S = 30.0
STOP_GRACE_S = 5.0
"""How long open connections get to finish once the server stops."""


class HttpThread:
    def __init__(self, app, host: str, port: int):
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False, timeout_graceful_shutdown=STOP_GRACE_S)
        self.server = uvicorn.Server(config)
        self.server.install_signal_handlers = lambda: None  # older uvicorn: the process decides
        self.thread = threading.Thread(target=self._run, name="pyengine-http", daemon=True)
        self.error: BaseException | None = None
        self.port = port

    def _run(self) -> None:
        try:
            self.server.run()
        except BaseException as e:  # a bind failure: reported by start()
            self.error = e

    def start(self) -> int:
        """Serve; returns the bound port (the one asked, or the free one picked for port 0)."""
        self.thread.start()
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self.server.config.host}:"
                                   f"{self.server.config.port}: {self.error or 'it exited (is the port in use?)'}")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self.port

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop accepting, let open responses finish (up to grace_s), then close."""
        self.server.should_exit = True
        self.thread.join(grace_s + 1.0)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(1.0)
