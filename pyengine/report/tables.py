"""Rich tables on the terminal: one helper, so plans, runs and benchmarks print the same way."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console


def console(width: int = 160) -> Console:
    """A rich Console on the current stdout; a fixed width when stdout is not a terminal."""
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else width,
                   highlight=False, soft_wrap=False)


def print_table(title: str, columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[Any]],
                out: Console | None = None, caption: str | None = None) -> None:
    """Print one table. A column is a name or (name, justify); cells are str()-ed; the caption is
    printed under the table (footnotes)."""
    from rich.table import Table

    out = out or console()
    table = Table(title=title, title_justify="left", show_lines=False, caption=caption,
                  caption_justify="left")
    for col in columns:
        name, justify = (col, "right") if isinstance(col, str) else col
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    out.print(table)
