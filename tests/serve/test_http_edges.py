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


def _get(app, path: str) -> tuple[int, dict]:
    """One GET through the ASGI app, without a server."""
    import json

    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET", "path": path,
             "raw_path": path.encode(), "root_path": "", "scheme": "http", "query_string": b"", "headers": [],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body)


def test_health_is_503_once_the_server_drains():
    from pyengine.serve.scheduler import Limits
    from pyengine.serve.session import Session

    session = Session(None, Limits(slots=2, blocks=8, block_size=4, step_tokens=4))
    app = app_mod.Frontend(session, TextCodec(None), model="tiny").app()
    assert _get(app, "/health")[0] == 200
    session.stop_admitting("the server is shutting down: no new requests are admitted")  # what SIGTERM does
    status, body = _get(app, "/health")
    assert status == 503 and "shutting down" in body["reason"]


def test_kv_blocks_beyond_what_the_slots_can_use_are_refused_before_any_rank_starts():
    from pyengine.core.errors import InputError
    from pyengine.core.spec import load_spec
    from pyengine.serve.engine_loop import ServeCapacity

    spec = load_spec("pyengine/configs/seed_model_3gpu.json")
    assert ServeCapacity(slots=2, capacity=32, blocks=4).resolve(spec)[1] == 4  # 2 x 32/16: all usable
    with pytest.raises(InputError, match=r"blocks = 2147483647: must be in \[1, 4\]"):
        ServeCapacity(slots=2, capacity=32, blocks=2**31 - 1).resolve(spec)  # was an 824 GB allocation


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "required"), ("functions", [{"name": "f"}]), ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
])
def test_chat_tools_and_constrained_output_are_refused_not_ignored(field, value):
    """A client asking for a tool call or JSON must not get free text it would take for one."""
    from pyengine.serve.openai_api import ApiError, chat_request

    body = {"messages": [{"role": "user", "content": "hi"}], field: value}
    with pytest.raises(ApiError, match=f"^{field} = .*: is not supported") as e:
        chat_request(body, has_text=True)
    assert e.value.status == 400 and e.value.param == field
    neutral = {"tools": [], "tool_choice": "none", "functions": [], "function_call": "none",
               "response_format": {"type": "text"}}[field]
    assert chat_request({**body, field: neutral}, has_text=True).messages == body["messages"]


def test_a_chat_body_that_is_not_an_object_is_a_400():
    from pyengine.serve.openai_api import ApiError, chat_request

    with pytest.raises(ApiError, match="must be a JSON object"):
        chat_request([1, 2], has_text=True)
