"""Plain JSON -> spec dataclasses, strictly, driven by the dataclasses' own annotations.

Strict JSON: bytes must be UTF-8; NaN and Infinity literals, duplicate keys, absurdly deep
nesting and integer literals too long to be a count are refused (1e400, which JSON reads as
Infinity, is refused by spec_rules with the field's path). Strict types: unknown keys (with a
did-you-mean), missing required keys, a bool where an int is expected, a string where a number
is expected: each is one SpecError naming the dotted path. Adding a field to a spec dataclass
needs no change here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from typing import Any

from pyengine.core.errors import SpecError
from pyengine.core.limits import MAX_INT_DIGITS

MAX_DEPTH = 32
"""Deepest JSON nesting accepted (a spec needs 5)."""


def parse_json(text: str | bytes, source: str) -> Any:
    """Decode and parse a JSON document, or raise SpecError naming `source` and the position."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise SpecError(source, text[max(0, e.start - 10): e.start + 10],
                            f"is not UTF-8 (byte {e.start}: {e.reason})") from None
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants,
                          parse_int=_short_int)
    except _Rejected as e:
        raise SpecError(source, e.value, e.rule) from None
    except json.JSONDecodeError as e:
        raise SpecError(source, text[max(0, e.pos - 20): e.pos + 20],
                        f"malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except RecursionError:
        raise SpecError(source, text[:40], f"JSON nested deeper than {MAX_DEPTH} levels") from None
    if _depth(data) > MAX_DEPTH:
        raise SpecError(source, text[:40], f"JSON nested deeper than {MAX_DEPTH} levels")
    return data


class _Rejected(ValueError):
    """Raised inside json.loads' hooks; parse_json turns it into a SpecError naming the source."""

    def __init__(self, value: Any, rule: str):
        super().__init__(rule)
        self.value, self.rule = value, rule


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _Rejected(key, "a key appears twice in one JSON object (the first would be lost)")
        out[key] = value
    return out


def _no_constants(name: str) -> Any:
    raise _Rejected(name, "NaN and Infinity are not numbers (JSON has no such literals)")


def _short_int(literal: str) -> int:
    # int() of a 5000-digit literal raises ValueError outside json's error type; refuse it here.
    if len(literal.lstrip("-")) > MAX_INT_DIGITS:
        raise _Rejected(literal, f"an integer literal of {len(literal)} digits is out of range")
    return int(literal)


def _depth(v: Any, level: int = 1) -> int:
    if level > MAX_DEPTH:
        return level
    if isinstance(v, dict):
        return max((_depth(x, level + 1) for x in v.values()), default=level)
    if isinstance(v, list):
        return max((_depth(x, level + 1) for x in v), default=level)
    return level


def build(cls: type, data: Any, path: str) -> Any:
    """An instance of dataclass `cls` from plain data, every field converted by its annotation."""
    where = path or "spec"
    if not isinstance(data, dict):
        raise SpecError(where, data, f"must be a JSON object, got {_json_type(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            near = difflib.get_close_matches(key, list(fields), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {sorted(fields)}"
            raise SpecError(_join(path, key), data[key], "unknown key" + hint)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, f in fields.items():
        if not f.init:
            continue
        fpath = _join(path, name)
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SpecError(fpath, None, "is required")
            continue
        kwargs[name] = convert(hints[name], data[name], fpath)
    return cls(**kwargs)


def convert(hint: Any, value: Any, path: str) -> Any:
    """`value` as type `hint` (int, float, str, bool, a dataclass, tuple[X, ...], X | None)."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return convert(inner, value, path) if value is not None else _fail(path, value, inner, True)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, path)
    if typing.get_origin(hint) is tuple:
        return _tuple(args[0], value, path)
    if _matches(hint, value):
        return _as_float(value, path) if hint is float else value
    return _fail(path, value, hint, False)


def _as_float(value: int | float, path: str) -> float:
    """Finiteness and ranges are spec_rules' job; an int too big for a float fails here."""
    try:
        return float(value)
    except OverflowError:
        raise SpecError(path, value, "is out of range for a number") from None


def _tuple(item: Any, value: Any, path: str) -> tuple:
    if not isinstance(value, list) or not value or not all(_converts(item, v, inner=True) for v in value):
        raise SpecError(path, value, f"must be a non-empty list of {_describe(item, plural=True)}")
    if typing.get_origin(item) is tuple:  # an inner list may be empty: the rules, which know
        # what it stands for (expert_ids: a GPU's experts), name what is wrong with that
        return tuple(tuple(convert(typing.get_args(item)[0], x, f"{path}[{i}][{j}]") for j, x in enumerate(v))
                     for i, v in enumerate(value))
    return tuple(convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))


def _converts(hint: Any, value: Any, inner: bool = False) -> bool:
    """`inner`: `value` is an element of a list, where an empty list may stand (see _tuple)."""
    if dataclasses.is_dataclass(hint):
        return True  # reported with its own path by build()
    if typing.get_origin(hint) is tuple:
        return isinstance(value, list) and (inner or bool(value)) and all(
            _converts(typing.get_args(hint)[0], v, inner=True) for v in value)
    return _matches(hint, value)


def _matches(hint: Any, value: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _fail(path: str, value: Any, hint: Any, nullable: bool) -> Any:
    if typing.get_origin(hint) is tuple:
        rule = f"must be a non-empty list of {_describe(typing.get_args(hint)[0], plural=True)}"
    else:
        rule = f"must be of type {_describe(hint, plural=False)}"
    raise SpecError(path, value, rule + (" or null" if nullable else ""))


def _describe(hint: Any, plural: bool) -> str:
    if dataclasses.is_dataclass(hint):
        return "objects" if plural else "object"
    if typing.get_origin(hint) is tuple:
        return f"lists of {_describe(typing.get_args(hint)[0], plural=True)}"
    name = {float: "number", int: "int", bool: "bool", str: "str"}.get(hint, str(hint))
    if not plural:
        return {"number": "float"}.get(name, name)
    return {"number": "numbers"}.get(name, name + "s")


def _json_type(v: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "bool", int: "int",
            float: "float", type(None): "null"}.get(type(v), type(v).__name__)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
