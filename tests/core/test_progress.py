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


class _Done:
    """A finished worker process."""
    def poll(self):
        return 0


def test_kernels_compile_bar_counts_every_job(monkeypatch):
    """run_jobs advances once per job as its worker's rows come back (workers stubbed: no compile)."""
    from pyengine.kernels import compile_check
    from pyengine.kernels.compile_jobs import Shapes, build_jobs

    jobs = build_jobs(Shapes(E=1, H=17, top_k=1, ffn_shards=(17,), tokens=(1,), num_partials=3), ["fp32"], 90)
    monkeypatch.setattr(compile_check, "_start_worker", lambda base, arch, js: (_Done(), js))
    monkeypatch.setattr(compile_check, "_collect", lambda proc, js, arch, timeout: [{"job": j} for j in js])
    con, buf = _terminal()
    with progress(len(jobs), "kernels compile", True, con) as advance:
        done = []
        compile_check.run_jobs(jobs, 90, workers=2, advance=lambda n: (done.append(n), advance(n)))
    assert sum(done) == len(jobs) > 1 and "100%" in buf.getvalue()
