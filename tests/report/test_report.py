"""pyengine.report: generic tables, number formats, JSON helpers, Chrome trace, Gantt PNG."""

import json
import math

from pyengine.core import units
from pyengine.core.spec import load_spec
from pyengine.core.timeline import Span, Timeline
from pyengine.predict import planner
from pyengine.predict import search as plan_search
from pyengine.predict.simulate import simulate
from pyengine.report import gantt, jsonable, plan_view, tables, trace

SEED = load_spec(None)


def test_print_table_generic(capsys):
    tables.print_table("Kernels vs cuBLAS", ["op", ("provider", "left"), "TFLOP/s"],
                       [["gate_up", "triton", 512.25], ["gate_up", "cublas", 600]])
    out = capsys.readouterr().out
    assert "Kernels vs cuBLAS" in out and "provider" in out and "512.25" in out and "cublas" in out


def test_formatters():
    assert units.fmt_bytes(2.5e9) == "2.50 GB" and units.fmt_bytes(12) == "12 B"
    assert units.fmt_s(0.0125) == "12.500 ms" and units.fmt_s(2e-6) == "2.0 us"
    assert units.fmt_flops(268.5e9) == "268.5 GFLOP"
    assert units.fmt_pct(0.281) == "28.1%"


def test_print_plan_and_candidates(capsys):
    p = planner.plan(SEED)
    plan_view.print_plan(p)
    cands = plan_search.search(SEED, micro_batches=(1, 4), kinds=("gpipe",), boundaries=("all_reduce",))
    plan_view.print_candidates(cands, top=3)
    out = capsys.readouterr().out
    assert "seed32g" in out and "Per GPU" in out and "DOES NOT HOLD" in out
    assert "Plan search" in out and "your config (reference)" in out


def test_to_json_plan_and_non_finite():
    data = json.loads(jsonable.to_json(planner.plan(SEED)))
    assert data["gpus"][0]["index"] == 0 and "verdicts" in data
    assert json.loads(jsonable.to_json({"x": math.inf, "y": (1, 2)})) == {"x": None, "y": [1, 2]}


def test_write_trace(tmp_path):
    tl = simulate(SEED)
    path = tmp_path / "trace.json"
    trace.write_trace(tl, path)
    data = json.loads(path.read_text())
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    assert len(events) == len(tl.spans)
    first = min(tl.spans, key=lambda s: (s.start_s, s.rank))
    ev = next(e for e in events if e["name"] == first.name and e["pid"] == first.rank)
    assert ev["ts"] == first.start_s * 1e6 and ev["dur"] > 0
    assert {e["pid"] for e in events} == {0, 1, 2}
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert set(lanes.values()) == {"compute", "comm"}


def test_write_gantt(tmp_path):
    spans = [Span(0, "compute", "s0.mb0.COMPUTE", "COMPUTE", 0, 0, 0.0, 1e-3),
             Span(0, "comm", "s0.mb0.SEND.act->1", "SEND", 0, 0, 1e-3, 1.2e-3),
             Span(1, "comm", "s1.mb0.RECV.act<-0", "RECV", 1, 0, 1e-3, 1.2e-3),
             Span(1, "compute", "s1.mb0.COMPUTE", "COMPUTE", 1, 0, 1.2e-3, 3e-3)]
    path = tmp_path / "gantt.png"
    gantt.write_gantt(Timeline(spans, 3e-3), path, "two ranks")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
