"""Hostile edges of the HTTP front end, driven directly (no server, no engine): a request body that
never fully arrives, JSON nested beyond what the decoder can read, and a non-streaming client that
goes away while its request waits for ids. Each is one clean outcome (a 400 for a body, an abort
for a client gone), never an exception escaping into the ASGI server's log as a 500."""

from __future__ import annotations

import asyncio

import pytest

from pyengine.serve import app as app_mod
from pyengine.serve import openai_api as api
from pyengine.serve.request import Finish, RequestHandle
from pyengine.serve.text import IncrementalText, TextCodec


class _Body:
    def __init__(self, raw: bytes | None = None, *, disconnect_after: float | None = None):
        self.raw, self.disconnect_after = raw, disconnect_after
        self.t0 = None

    async def body(self) -> bytes:
        if self.raw is None:
            from starlette.requests import ClientDisconnect

            raise ClientDisconnect()
        return self.raw

    async def is_disconnected(self) -> bool:
        loop = asyncio.get_running_loop()
        self.t0 = self.t0 or loop.time()
        return self.disconnect_after is not None and loop.time() - self.t0 >= self.disconnect_after


def test_json_nested_beyond_the_decoder_is_a_400_not_a_500():
    with pytest.raises(api.ApiError, match="nested too deep") as e:
        asyncio.run(app_mod._json(_Body(b"[" * 100_000 + b"]" * 100_000)))
    assert e.value.status == 400


def test_a_body_cut_off_by_a_disconnect_is_an_api_error():
    with pytest.raises(api.ApiError, match="disconnected") as e:
        asyncio.run(app_mod._json(_Body(None)))
    assert e.value.status == 400


def test_a_non_streaming_client_that_goes_away_aborts_cleanly(monkeypatch):
    monkeypatch.setattr(app_mod, "DISCONNECT_POLL_S", 0.01)
    frontend = app_mod.Frontend(None, TextCodec(None), model="tiny")
    handle = RequestHandle(0, 3, None)  # nothing ever steps: only the disconnect can end the wait
    aborted = []
    handle._abort = lambda: aborted.append(True)

    async def main():
        return await frontend._wait(handle, IncrementalText(TextCodec(None)), _Body(disconnect_after=0.05))

    assert asyncio.run(main()) is Finish.ABORT  # before the fix: RuntimeError from aclose()
    assert aborted
    assert handle.listeners == []  # the update generator was closed, its wake-up removed
