"""The OpenAI-compatible request bodies the server accepts, checked field by field, and the
response bodies it returns.

A bad field is an ApiError (HTTP 400 unless said otherwise) whose message names the field, the
value and the rule, in the OpenAI error shape {"error": {"message", "type", "param", "code"}}, so
the official client raises BadRequestError with that message.
"""

from __future__ import annotations

import numbers
import os
import time
from dataclasses import dataclass
from typing import Any

from pyengine.core.errors import InputError, echo
from pyengine.serve.params import MAX_TEMPERATURE, SamplingParams

MAX_STOP_STRINGS = 4
"""Stop strings per request (OpenAI's limit)."""
MAX_API_TEMPERATURE = 2.0
"""OpenAI's temperature range is [0, 2]."""
IGNORED_DEFAULTS = {"n": (None, 1), "best_of": (None, 1), "echo": (None, False), "logprobs": (None, False),
                    "top_logprobs": (None, 0), "logit_bias": (None,), "suffix": (None,),
                    "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0)}
"""Fields this server does not implement: accepted only at their neutral values."""
CHAT_IGNORED_DEFAULTS = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
                         "function_call": (None, "none"), "response_format": (None, {"type": "text"})}
"""Chat fields it does not implement (tool calls, constrained output): refused unless neutral, so a
client asking for JSON or a tool call never gets free text it would take for one."""


class ApiError(Exception):
    def __init__(self, message: str, *, status: int = 400, param: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.kind = status, param, kind

    @classmethod
    def from_input(cls, e: InputError, status: int = 400) -> ApiError:
        return cls(str(e), status=status, param=e.field.split("[")[0])

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.status}}


def bad(field: str, value: Any, rule: str) -> ApiError:
    return ApiError(f"{field} = {echo(value)}: {rule}", param=field)


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What one /v1/completions or /v1/chat/completions body asks for, once checked."""

    prompt: list[int] | str | None
    """Token ids or text (completions); None for chat (messages instead)."""
    messages: list[dict] | None
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    steps_field: str = "max_tokens"
    """The body's name for max_new_tokens (chat: max_completion_tokens when given)."""


def _same(value, neutral) -> bool:
    """`value` is `neutral` in value and JSON type (true is not 1, 0 is not false)."""
    if value is None or neutral is None:
        return value is neutral
    return isinstance(value, bool) == isinstance(neutral, bool) and type(value) in (int, float, type(neutral)) \
        and value == neutral


def _number(body: dict, field: str, default, *, lo, hi, integer=False, lo_open=False):
    value = body.get(field)
    if value is None:
        return default
    from pyengine.core.limits import check_number

    try:
        check_number(field, value, lo=lo, hi=hi, integer=integer, lo_open=lo_open)
    except InputError as e:
        raise ApiError.from_input(e) from None
    return value


def _seed(body: dict, temperature: float) -> int:
    seed = _number(body, "seed", None, lo=0, hi=2**63 - 1, integer=True)
    if seed is None:  # no seed: a fresh draw per request (greedy ignores it)
        return int.from_bytes(os.urandom(8), "little") >> 1 if temperature > 0 else 0
    return seed


def _stop(body: dict, has_text: bool) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", stop, "must be a string or a list of strings")
    if len(stops) > MAX_STOP_STRINGS:
        raise bad("stop", stop, f"at most {MAX_STOP_STRINGS} strings")
    if stops and not has_text:
        raise bad("stop", stop, "needs a tokenizer in the model folder (use stop_token_ids)")
    return tuple(s for s in stops if s)


def _stop_ids(body: dict) -> tuple[int, ...]:
    ids = body.get("stop_token_ids")
    if ids is None:
        return ()
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad("stop_token_ids", ids, "must be a list of token ids")
    return tuple(ids)


def _neutral_only(body: dict, fields: dict[str, tuple]) -> None:
    for field, neutral in fields.items():
        if field in body and not any(_same(body[field], n) for n in neutral):
            raise bad(field, body[field], f"is not supported (only {neutral[-1]!r})")


def _common(body: dict, has_text: bool, max_tokens_field: str = "max_tokens") -> tuple:
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, not {type(body).__name__}")
    _neutral_only(body, IGNORED_DEFAULTS)
    from pyengine.model.prompts import MAX_NEW_TOKENS

    max_tokens = _number(body, max_tokens_field, 16, lo=1, hi=MAX_NEW_TOKENS, integer=True)
    temperature = _number(body, "temperature", 1.0, lo=0, hi=min(MAX_API_TEMPERATURE, MAX_TEMPERATURE))
    top_p = _number(body, "top_p", 1.0, lo=0, hi=1, lo_open=True)
    top_k = _number(body, "top_k", 0, lo=-1, hi=2**31 - 1, integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool) and stream is not None:
        raise bad("stream", stream, "must be true or false")
    ignore_eos = body.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise bad("ignore_eos", ignore_eos, "must be true or false")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise bad("stream_options", options, "must be an object")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool) and include_usage is not None:
        raise bad("stream_options.include_usage", include_usage, "must be true or false")
    try:
        params = SamplingParams(max_new_tokens=max_tokens, temperature=float(temperature),
                                top_k=max(0, top_k), top_p=float(top_p), seed=_seed(body, temperature),
                                stop_token_ids=_stop_ids(body), ignore_eos=ignore_eos)
    except InputError as e:
        raise ApiError.from_input(e) from None
    return params, _stop(body, has_text), bool(stream), bool(include_usage)


def completion_request(body: dict, has_text: bool) -> GenerationRequest:
    params, stop, stream, usage = _common(body, has_text)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one prompt
    if isinstance(prompt, str):
        if not has_text:
            raise bad("prompt", prompt, "must be token ids: the model folder has no tokenizer")
        if not prompt:
            raise bad("prompt", prompt, "must not be empty")
    elif isinstance(prompt, list) and prompt and all(isinstance(t, numbers.Integral) and not isinstance(t, bool)
                                                     for t in prompt):
        prompt = [int(t) for t in prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise bad("prompt", prompt, "one prompt per request (a list of prompts is not supported)")
    else:
        raise bad("prompt", prompt, "must be text or a non-empty list of token ids")
    return GenerationRequest(prompt, None, params, stop, stream, usage)


def chat_request(body: dict, has_text: bool) -> GenerationRequest:
    field = "max_completion_tokens" if isinstance(body, dict) and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    params, stop, stream, usage = _common(body, has_text, field)
    _neutral_only(body, CHAT_IGNORED_DEFAULTS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", messages, "must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}]", m, "must be an object with a string role")
        if not isinstance(m.get("content"), str):
            raise bad(f"messages[{i}].content", m.get("content"), "must be a string")
    return GenerationRequest(None, [{"role": m["role"], "content": m["content"]} for m in messages],
                             params, stop, stream, usage, field)


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, text: str, ids: list[int], finish: str | None,
                    prompt_tokens: int, *, chat: bool) -> dict:
    choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None, "token_ids": ids}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(prompt_tokens, len(ids))}


def chunk_body(rid: str, model: str, text: str | None, ids: list[int], finish: str | None, *, chat: bool,
               first: bool = False) -> dict:
    choice: dict = {"index": 0, "finish_reason": finish, "logprobs": None, "token_ids": ids}
    if chat:
        delta: dict = {"role": "assistant"} if first else {}
        if text is not None:
            delta["content"] = text
        choice["delta"] = delta
    else:
        choice["text"] = text or ""
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice]}


def usage_chunk(rid: str, model: str, prompt_tokens: int, completion_tokens: int, *, chat: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}
