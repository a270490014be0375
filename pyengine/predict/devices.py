"""Device profiles by name or file: the presets (pyengine.predict.presets) and the JSON format that
`--device FILE` reads and `pyengine calibrate` writes. The profile and its time model are
pyengine.predict.device_profile.

A file holds the profile's numbers by field name, and may also hold
  "base": "<preset>"     start from a preset (its numbers and their sources) and override some;
  "sources": {field: {"kind": datasheet|published|fit|measured|file|assumption, "ref": "..."}}
                         where each number it sets comes from (default: kind "file", this file);
  "provenance": {...}    machine, date, commit and command of a measured profile;
  "bandwidth_efficiency" the former single efficiency: sets hbm_efficiency and link_efficiency
                         (each unless the file sets it itself).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from pyengine.core.spec import SpecError
from pyengine.core.spec_parse import parse_json
from pyengine.predict.device_profile import (DeviceProfile, DeviceProfileError, Source, SourceKind,
                                             number_fields)
from pyengine.predict.presets import DEFAULT_PRESET, PRESETS

__all__ = ["DEFAULT_PRESET", "PRESETS", "DeviceProfile", "DeviceProfileError", "Source", "SourceKind",
           "load_profile", "profile_from_dict"]

LEGACY_EFFICIENCY = "bandwidth_efficiency"
_META_KEYS = ("base", "sources", "provenance", LEGACY_EFFICIENCY)


def load_profile(name_or_path: str | os.PathLike | DeviceProfile | None = None) -> DeviceProfile:
    """A preset by name (h100, h200, seed32g), a JSON profile file, or None (DEFAULT_PRESET)."""
    if isinstance(name_or_path, DeviceProfile):
        return name_or_path
    if name_or_path is None:
        return PRESETS[DEFAULT_PRESET]
    key = os.fspath(name_or_path)
    if key in PRESETS:
        return PRESETS[key]
    if not os.path.exists(key):
        raise DeviceProfileError("device", key,
                                 f"neither a preset ({', '.join(PRESETS)}) nor an existing file")
    try:
        with open(key, "rb") as f:
            text = f.read()
    except OSError as e:
        raise DeviceProfileError("device", key, f"cannot be read: {e.strerror}") from None
    try:  # the spec's strict JSON: UTF-8 only, no NaN/Infinity, no duplicate keys, bounded depth
        data = parse_json(text, key)
    except SpecError as e:
        raise DeviceProfileError(e.field, e.value, e.rule) from None
    return profile_from_dict(data, default_name=os.path.splitext(os.path.basename(key))[0], origin=key)


def profile_from_dict(data: Any, default_name: str = "custom", origin: str = "a profile dict") -> DeviceProfile:
    """The profile a file's JSON object describes (module docstring); `origin` names the file in
    the sources of the numbers it sets without saying where they came from."""
    if not isinstance(data, dict):
        raise DeviceProfileError("device", data, "must be a JSON object")
    data = dict(data)
    known = {f.name for f in dataclasses.fields(DeviceProfile)} - {"sources", "provenance"}
    for key, v in data.items():
        if key not in known and key not in _META_KEYS:
            raise DeviceProfileError(f"device.{key}", v, f"unknown field; known: {sorted(known | set(_META_KEYS))}")
    values, sources = _base(data.pop("base", None), default_name)
    given = {k: data[k] for k in data if k in known}
    legacy = data.pop(LEGACY_EFFICIENCY, None)
    if legacy is not None:
        for name in ("hbm_efficiency", "link_efficiency"):
            given.setdefault(name, legacy)
    own = _sources(data.get("sources", {}), given)
    for key, v in given.items():
        values[key] = v
        if key != "name":
            sources[key] = own.get(key, Source(SourceKind.FILE, origin))
    values.setdefault("name", default_name)
    for name, f in ((f.name, f) for f in dataclasses.fields(DeviceProfile)):
        if name not in values and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise DeviceProfileError(f"device.{name}", None, "is required (or set \"base\" to a preset)")
    return DeviceProfile(**values, sources=sources, provenance=_provenance(data.get("provenance", {})))


def _base(base: Any, default_name: str) -> tuple[dict[str, Any], dict[str, Source]]:
    if base is None:
        return {}, {}
    if base not in PRESETS:
        raise DeviceProfileError("device.base", base, f"must be one of {sorted(PRESETS)}")
    preset = PRESETS[base]
    values = {name: getattr(preset, name) for name in number_fields()}
    values["name"] = f"{default_name} (from {base})"
    return values, dict(preset.sources)


def _sources(raw: Any, given: dict[str, Any]) -> dict[str, Source]:
    if not isinstance(raw, dict):
        raise DeviceProfileError("device.sources", raw, "must be an object: field -> {kind, ref}")
    kinds = [k.value for k in SourceKind]
    out = {}
    for name, entry in raw.items():
        where = f"device.sources.{name}"
        if name not in given or name == "name":
            raise DeviceProfileError(where, entry, "names no number this file sets")
        if not isinstance(entry, dict) or set(entry) != {"kind", "ref"}:
            raise DeviceProfileError(where, entry, 'must be {"kind": ..., "ref": ...}')
        if entry["kind"] not in kinds:
            raise DeviceProfileError(f"{where}.kind", entry["kind"], f"must be one of {kinds}")
        if not isinstance(entry["ref"], str) or not entry["ref"].strip():
            raise DeviceProfileError(f"{where}.ref", entry["ref"], "must be a non-empty string")
        out[name] = Source(SourceKind(entry["kind"]), entry["ref"])
    return out


def _provenance(raw: Any) -> dict[str, str]:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise DeviceProfileError("device.provenance", raw, "must be an object of strings (machine, date, commit, command)")
    return dict(raw)
