"""Progress bars (pyengine.core.progress): silent under a pipe, advancing to total on a terminal."""
import io
import subprocess
import sys

from rich.console import Console

from pyengine.predict import search as plan_search
from pyengine.core.progress import progress
from pyengine.core.spec import load_spec

SEED = load_spec(None)


def _terminal() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=True, width=100), buf


def test_bar_advances_to_total_on_a_terminal():
    con, buf = _terminal()
    with progress(3, "work", True, con) as advance:
        for _ in range(3):
            advance()
    assert "work" in buf.getvalue() and "100%" in buf.getvalue()


def test_disabled_bar_draws_nothing():
    con, buf = _terminal()
    with progress(3, "work", False, con) as advance:
        advance()
    assert buf.getvalue() == ""


def test_search_bar_counts_every_stage_map():
    con, buf = _terminal()
    plan_search.search(SEED, micro_batches=(1,), kinds=("gpipe",), show_progress=True, console=con)
    assert "plan search" in buf.getvalue() and "100%" in buf.getvalue()


def test_plan_search_under_a_pipe_draws_no_bar():
    r = subprocess.run([sys.executable, "-m", "pyengine", "plan", "--search", "--top", "1"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "plan search" not in r.stderr and "\x1b[" not in r.stderr
