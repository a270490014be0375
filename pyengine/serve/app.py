"""The HTTP side of `pyengine serve`: an OpenAI-compatible FastAPI app over a Session.

    frontend = Frontend(session, TextCodec.for_folder(weights), model="tiny", metrics=ServeMetrics(session))
    app = frontend.app()          # /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics

The app never steps the engine: handlers submit to the session (a queue) and wait for their
request's ids on the event loop, woken from the stepping thread through call_soon_threadsafe, so
no handler blocks the event loop on a step. A client that goes away (a closed stream, or a
disconnect while a non-streaming request runs) aborts its request, which frees its KV blocks at
the next step.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator

from fastapi import Request  # at module level: FastAPI resolves the handlers' annotations here

from pyengine.core.errors import InputError
from pyengine.serve import openai_api as api
from pyengine.serve.request import Finish, RequestHandle
from pyengine.serve.session import Closed, Session
from pyengine.serve.text import IncrementalText, TextCodec

DISCONNECT_POLL_S = 0.25
"""How often a non-streaming request checks that its client is still there."""


class Frontend:
    def __init__(self, session: Session, codec: TextCodec, *, model: str, metrics=None,
                 max_model_len: int | None = None, device: str = ""):
        self.session, self.codec, self.model, self.metrics = session, codec, model, metrics
        self.max_model_len, self.device = max_model_len, device
        self.unavailable = ""
        """Why /health says 503 (shutting down, a rank failed); empty while healthy."""
        self._ids = itertools.count()

    # ---- the app ---------------------------------------------------------------------------------------
    def app(self):
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse, Response

        app = FastAPI(title="pyengine", docs_url=None, redoc_url=None, openapi_url=None)

        @app.exception_handler(api.ApiError)
        async def api_error(request: Request, e: api.ApiError):
            return JSONResponse(e.body(), status_code=e.status)

        @app.get("/health")
        async def health():
            why = self.unavailable or ("" if self.session.admitting else
                                       self.session.failure or "the server is shutting down")
            if why:  # failed, or draining after SIGTERM: a load balancer should send no more
                return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)
            return {"status": "ok", "device": self.device}

        @app.get("/v1/models")
        async def models():
            card = {"id": self.model, "object": "model", "created": 0, "owned_by": "pyengine",
                    "max_model_len": self.max_model_len, "vocab_size": self.session.limits.vocab_size}
            return {"object": "list", "data": [card]}

        @app.get("/metrics")
        async def metrics():
            from prometheus_client import CONTENT_TYPE_LATEST

            body = self.metrics.render() if self.metrics is not None else b""
            return Response(body, media_type=CONTENT_TYPE_LATEST)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await self._generate(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            if not self.codec.has_chat:
                raise api.ApiError("/v1/chat/completions needs a tokenizer with a chat template in the model folder",
                                   status=404, kind="not_found_error")
            return await self._generate(request, chat=True)

        return app

    # ---- one request -------------------------------------------------------------------------------------
    async def _generate(self, request, *, chat: bool):
        from fastapi.responses import JSONResponse, StreamingResponse

        body = await _json(request)
        self._check_model(body)
        parse = api.chat_request if chat else api.completion_request
        req = parse(body, self.codec.has_text)
        handle = self._submit(req, chat)
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{next(self._ids)}"
        text = IncrementalText(self.codec, req.stop)
        if req.stream:
            return StreamingResponse(self._stream(handle, text, rid, req, chat), media_type="text/event-stream")
        finish = await self._wait(handle, text, request)
        if _server_ended(finish, handle):
            return JSONResponse(_unavailable(handle).body(), status_code=503)
        ids = text.ids
        body = api.completion_body(rid, self.model, text.text + text.finish(), ids,
                                   _finish_reason(finish, text), handle.prompt_tokens, chat=chat)
        return JSONResponse(body)

    def _check_model(self, body) -> None:
        model = body.get("model") if isinstance(body, dict) else None
        if model is not None and model != self.model:
            raise api.ApiError(f"model = {model!r}: this server serves {self.model!r}", status=404,
                               param="model", kind="not_found_error")

    def _submit(self, req: api.GenerationRequest, chat: bool) -> RequestHandle:
        field = "messages" if chat else "prompt"
        if chat:
            prompt = self.codec.chat_prompt(req.messages)
        else:
            prompt = self.codec.encode(req.prompt) if isinstance(req.prompt, str) else req.prompt
        try:
            return self.session.submit(prompt, req.params, field=field, steps_field=req.steps_field)
        except InputError as e:
            raise api.ApiError.from_input(e) from None
        except Closed as e:
            raise api.ApiError(str(e), status=503, kind="server_error") from None

    async def _updates(self, handle: RequestHandle) -> AsyncIterator[tuple[list[int], Finish | None]]:
        """(new ids, finish) each time the stepping thread publishes; ends after the finish."""
        loop = asyncio.get_running_loop()
        changed = asyncio.Event()

        def wake() -> None:
            loop.call_soon_threadsafe(changed.set)

        handle.listeners.append(wake)
        seen = 0
        try:
            while True:
                changed.clear()
                ids, finish = handle.snapshot()
                if len(ids) > seen or finish is not None:
                    yield ids[seen:], finish
                    seen = len(ids)
                if finish is not None:
                    return
                await changed.wait()
        finally:
            handle.listeners.remove(wake)

    async def _wait(self, handle: RequestHandle, text: IncrementalText, request) -> Finish:
        """A non-streaming request to its end; aborted when its client disconnects."""
        updates = self._updates(handle)
        watcher = asyncio.create_task(_disconnected(request))
        try:
            async for ids, finish in _until(updates, watcher):
                text.add(ids)
                if text.stopped:
                    handle.abort()
                    return Finish.STOP
                if finish is not None:
                    return finish
            handle.abort()  # the client went away
            return Finish.ABORT
        finally:
            watcher.cancel()
            await updates.aclose()

    async def _stream(self, handle: RequestHandle, text: IncrementalText, rid: str,
                      req: api.GenerationRequest, chat: bool) -> AsyncIterator[bytes]:
        """Server-sent events; a closed connection cancels this generator, which aborts the request."""
        finished = False
        try:
            if chat:
                yield _event(api.chunk_body(rid, self.model, "", [], None, chat=True, first=True))
            async for ids, finish in self._updates(handle):
                piece = text.add(ids)
                if text.stopped:
                    handle.abort()
                    finish = Finish.STOP
                if _server_ended(finish, handle):
                    yield _event(_unavailable(handle).body())
                    finished = True
                    return
                if finish is not None:
                    piece += text.finish()
                if piece or ids or finish is not None:
                    yield _event(api.chunk_body(rid, self.model, piece, ids, _finish_reason(finish, text), chat=chat))
                if finish is not None:
                    break
            if req.include_usage:
                yield _event(api.usage_chunk(rid, self.model, handle.prompt_tokens, len(text.ids), chat=chat))
            yield b"data: [DONE]\n\n"
            finished = True
        finally:
            if not finished:
                handle.abort()  # the client went away mid-stream: free its slot and blocks

    def fail(self, why: str) -> None:
        """Every in-flight request ends with 503 `why`; /health says so."""
        self.unavailable = why
        self.session.fail(why)


def _server_ended(finish: Finish | None, handle: RequestHandle) -> bool:
    """The engine failed, or the server aborted the request as it shut down (not its client)."""
    return finish is Finish.FAILED or (finish is Finish.ABORT and bool(handle.error))


def _unavailable(handle: RequestHandle) -> api.ApiError:
    return api.ApiError(handle.error or "the request was aborted", status=503, kind="server_error")


def _finish_reason(finish: Finish | None, text: IncrementalText) -> str | None:
    if text.stopped:
        return "stop"
    if finish is None:
        return None
    return "length" if finish is Finish.LENGTH else "stop"


def _event(obj: dict) -> bytes:
    return f"data: {json.dumps(obj)}\n\n".encode()


async def _json(request):
    from starlette.requests import ClientDisconnect

    try:
        raw = await request.body()
    except ClientDisconnect:  # the client went away mid-body: nobody to answer, nothing submitted
        raise api.ApiError("the client disconnected before its request body arrived") from None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise api.ApiError(f"the request body is not JSON: {e}") from None
    except RecursionError:  # json's C decoder recurses per nesting level
        raise api.ApiError("the request body is not JSON this server reads: nested too deep") from None


async def _disconnected(request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


async def _until(updates: AsyncIterator, watcher: asyncio.Task) -> AsyncIterator:
    """The updates until `watcher` (the client's disconnect) finishes first."""
    while True:
        nxt = asyncio.ensure_future(updates.__anext__())
        done, _ = await asyncio.wait({nxt, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if nxt not in done:
            nxt.cancel()  # and wait until it is: the generator may be closed only once it stopped running
            await asyncio.wait({nxt})
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return
