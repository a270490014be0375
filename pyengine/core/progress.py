"""One home for progress bars on long work (plan --search, kernels compile, bench comm, ...).

The bar is drawn on stderr with rich.progress, and only when stderr is a terminal and the
caller did not ask for --json: under a pipe, in CI logs or in machine-readable output it draws
nothing, so nothing of it can corrupt captured text."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator


def _noop(n: int = 1) -> None:
    """Advance of a disabled bar: does nothing."""


@contextmanager
def progress(total: int | None, what: str, enabled: bool = True,
             console=None) -> Iterator[Callable[[int], None]]:
    """Yield advance(n=1). A rich bar over `total` steps labelled `what`, drawn on stderr when
    `enabled` and stderr is a terminal (or on an injected `console`, e.g. in tests)."""
    if console is None:
        if not (enabled and sys.stderr.isatty()):
            yield _noop
            return
        from rich.console import Console
        console = Console(stderr=True)
    elif not enabled:
        yield _noop
        return
    from rich.progress import Progress
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task(what, total=total)
        yield lambda n=1: bar.advance(task, n)
        bar.refresh()
