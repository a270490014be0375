"""Bad input, named: every user-facing input error says the field, the value and the rule, in
one line (the CLI prints it and exits 2 before anything starts)."""

from __future__ import annotations

from typing import Any

ECHO_LIMIT = 80
"""Characters of an offending value echoed back: a 50 MB string must not become a 50 MB line."""


def echo(value: Any) -> str:
    if isinstance(value, (str, bytes)) and len(value) > ECHO_LIMIT:
        text = repr(value[:ECHO_LIMIT])[:ECHO_LIMIT]  # cut before repr: no 50 MB copy first
        return f"{text}... ({len(value)} characters)"
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's 4300-digit str() limit
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    if len(text) > ECHO_LIMIT:
        text = f"{text[:ECHO_LIMIT]}... ({len(text)} characters)"
    return one_line(text)


def one_line(text: str) -> str:
    """`text` as one line: a line break inside it (a path may hold one) shown as \\n or \\r, so
    a message never spills onto a second line that reads as something else."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


class InputError(ValueError):
    """An input (config key, command-line option, file) breaks a rule. `field` names it."""

    kind = "bad input"

    def __init__(self, field: str, value: Any, rule: str):
        self.field, self.value, self.rule = field, value, rule
        super().__init__(one_line(f"{field} = {echo(value)}: {rule}"))


class UsageError(InputError):
    """A command-line option breaks a rule."""

    kind = "bad option"


class SpecError(InputError):
    """A deployment spec breaks a rule. `field` is the dotted path of the offending key."""

    kind = "invalid config"


class ResourceError(InputError):
    """A job needs more memory than it has: names the rank and stage, the need and the budget."""

    kind = "does not fit"

    def __init__(self, where: str, need: str, budget: str):
        self.field, self.value, self.rule = where, need, budget
        ValueError.__init__(self, one_line(f"{where} needs {need}; {budget}"))
