"""A kernel option given by name (the spec's word) or as the enum the kernel takes as a constexpr."""

from __future__ import annotations

import enum


class Choice(enum.IntEnum):
    """An IntEnum a kernel takes as a constexpr; `parse` accepts a member or its lower-case name."""

    def __init_subclass__(cls, field: str = "", **kw):
        super().__init_subclass__(**kw)
        cls._argument = field or cls.__name__  # the argument's name in errors

    @classmethod
    def parse(cls, value):
        if isinstance(value, cls):
            return value
        names = {m.name.lower(): m for m in cls}
        if value not in names:
            raise ValueError(f"{cls._argument}={value!r}: must be one of {sorted(names)}")
        return names[value]
