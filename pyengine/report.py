"""Output: rich tables on the terminal, JSON for machines, Chrome/Perfetto traces, Gantt PNGs.

The table helpers are generic (`print_table(title, columns, rows)`, the fmt_* helpers) so
the runtime and benchmark reports print the same way as the planner.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from pyengine.timeline import COMM_LANE, COMPUTE_LANE, Timeline

if TYPE_CHECKING:
    from rich.console import Console

    from pyengine.plan_search import Candidate
    from pyengine.planner import Plan


# ---- formatting ------------------------------------------------------------------------------
def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.3f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3f} ms"
    return f"{s * 1e6:.1f} us"


def fmt_flops(f: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if abs(f) >= scale:
            return f"{f / scale:.1f} {unit}"
    return f"{f:.0f} FLOP"


def fmt_signed_pct(x: float) -> str:
    """A relative change as a signed percentage: +43.0%, -22.1%."""
    return f"{'+' if x >= 0 else ''}{100 * x:.1f}%"


def fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


# ---- tables --------------------------------------------------------------------------------
def console(width: int = 160) -> Console:
    """A rich Console on the current stdout; a fixed width when stdout is not a terminal."""
    from rich.console import Console

    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else width,
                   highlight=False, soft_wrap=False)


def print_table(title: str, columns: Sequence[str | tuple[str, str]], rows: Iterable[Sequence[Any]],
                out: Console | None = None) -> None:
    """Print one table. A column is a name or (name, justify); cells are str()-ed."""
    from rich.table import Table

    out = out or console()
    table = Table(title=title, title_justify="left", show_lines=False)
    for col in columns:
        name, justify = (col, "right") if isinstance(col, str) else col
        table.add_column(name, justify=justify)
    for row in rows:
        table.add_row(*(str(c) for c in row))
    out.print(table)


# ---- the plan ------------------------------------------------------------------------------------
def print_plan(p: Plan, device_note: str = "", out: Console | None = None) -> None:
    out = out or console()
    spec = p.spec
    out.print(f"device profile: {p.device.name}{device_note} -- peak {p.device.peak_tflops_bf16:g} TFLOP/s bf16, "
              f"{p.device.hbm_gb_s:g} GB/s HBM, {spec.hardware.interconnect} "
              f"{p.device.link(spec.hardware.interconnect)[0] / p.device.bandwidth_efficiency / 1e9:g} GB/s/dir; "
              f"efficiency {p.device.gemm_efficiency:g} GEMM, {p.device.bandwidth_efficiency:g} bandwidth",
              soft_wrap=True)
    out.print(f"config: {spec.schedule.kind}, m={spec.schedule.micro_batches}, boundary {spec.comm.boundary}, "
              f"overlap {'on' if spec.comm.overlap else 'off'}, T={spec.model.tokens} tokens, {spec.model.dtype}")
    print_table(
        "Per GPU (per batch; comm per micro-batch by peer)",
        [("GPU", "right"), ("parts", "left"), "FLOPs", "share", "weights", "activations", "memory",
         "fits", ("sent/mb", "left"), ("recv/mb", "left"), "busy", "comm lane"],
        [[g.index, " + ".join(g.parts), fmt_flops(g.flops), fmt_pct(g.flop_share), fmt_bytes(g.weight_bytes),
          fmt_bytes(g.activation_bytes), f"{fmt_bytes(g.memory_bytes)} ({fmt_pct(g.memory_fraction)})",
          "yes" if g.fits else "NO", _peers(g.sent_per_peer, "->"), _peers(g.recv_per_peer, "<-"),
          fmt_s(g.busy_s), fmt_s(g.comm_s)] for g in p.gpus], out)
    print_table(
        "Per stage",
        [("stage", "left"), ("GPUs", "left"), "FLOPs", "weights", "activations/mb", "sent", "busy (slowest GPU)"],
        [[f"{s.index} {s.name}", s.gpus, fmt_flops(s.flops), fmt_bytes(s.weight_bytes),
          fmt_bytes(s.activation_bytes), fmt_bytes(s.sent_bytes), fmt_s(s.busy_s)] for s in p.stages], out)
    pr = p.predicted
    print_table(
        "Predicted (simulated schedule tables) and baselines",
        [("deployment", "left"), "latency", "throughput (tok/s)", "bubble", "utilisation", ("note", "left")],
        [["this config", fmt_s(pr.latency_s), f"{pr.throughput_tokens_per_s:,.0f}", fmt_pct(pr.bubble_fraction),
          f"{fmt_pct(pr.utilization)} (steady {fmt_pct(pr.steady_state_utilization)})",
          f"exposed comm {fmt_s(pr.exposed_comm_s)}, hidden {fmt_pct(pr.hidden_comm_fraction)}, "
          f"MFU {fmt_pct(pr.mfu)}"]]
        + [[b.name, fmt_s(b.latency_s), f"{b.throughput_tokens_per_s:,.0f}", "", "",
            b.description + ("" if b.fits else f"; {b.note}")] for b in p.baselines], out)
    out.print("Verdicts:")
    for v in p.verdicts:
        mark = {True: "[green]HOLDS[/]", False: "[red]DOES NOT HOLD[/]", None: "[yellow]PARTLY[/]"}[v.holds]
        out.print(f"  {mark}  {v.text}", soft_wrap=True)


def _peers(d: dict[int, float], arrow: str) -> str:
    return ", ".join(f"{arrow}{p} {fmt_bytes(b)}" for p, b in d.items()) or "-"


def print_candidates(cands: Sequence[Candidate], top: int = 10, out: Console | None = None) -> None:
    out = out or console()
    shown = list(cands[:top])
    seed = next((c for c in cands if c.is_seed), None)
    if seed is not None and seed not in shown:
        shown.append(seed)
    print_table(
        f"Plan search: {len(cands)} valid candidates, top {min(top, len(cands))} "
        f"(+ the seed for reference); '*' = Pareto-optimal in latency and throughput",
        ["#lat", "#thr", ("candidate", "left"), "latency", "tok/s", "bubble", ("why (vs seed)", "left")],
        [[c.rank_latency, c.rank_throughput, ("* " if c.pareto else "") + c.label + ("" if c.fits else " (no fit)"),
          fmt_s(c.latency_s), f"{c.throughput_tokens_per_s:,.0f}", fmt_pct(c.bubble_fraction), c.why]
         for c in shown], out)


def print_timeline(tl: Timeline, title: str = "Simulated timeline", out: Console | None = None) -> None:
    out = out or console()
    out.print(f"{title}: makespan {fmt_s(tl.makespan_s)}, bubble {fmt_pct(tl.bubble_fraction)}, "
              f"hidden comm {fmt_pct(tl.hidden_comm_fraction)}", soft_wrap=True)
    print_table(
        "Per rank",
        ["rank", "compute", "busy", "comm lane", "exposed comm"],
        [[r, fmt_s(tl.compute_s(r)), fmt_pct(tl.busy(r)), fmt_s(tl.comm_s(r)), fmt_s(tl.exposed_comm_s(r))]
         for r in tl.ranks], out)


# ---- JSON --------------------------------------------------------------------------------------
def to_jsonable(obj: Any) -> Any:
    """Plain data from objects with to_dict(), dataclasses, dicts, lists and floats (inf/nan -> None)."""
    if hasattr(obj, "to_dict"):
        return to_jsonable(obj.to_dict())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return to_jsonable(dataclasses.asdict(obj))
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def to_json(obj: Any, indent: int | None = 2) -> str:
    return json.dumps(to_jsonable(obj), indent=indent)


# ---- trace and Gantt ---------------------------------------------------------------------------
_LANE_TID = {COMPUTE_LANE: 0, COMM_LANE: 1}


def write_trace(tl: Timeline, path: str | os.PathLike) -> None:
    """Chrome/Perfetto JSON: one complete ("X") event per span; pid = rank, tid = lane
    (0 compute, 1 comm, named by thread_name metadata), name = action id, times in us."""
    events: list[dict] = []
    for r in tl.ranks:
        events.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"GPU {r}"}})
        for lane, tid in _LANE_TID.items():
            events.append({"ph": "M", "name": "thread_name", "pid": r, "tid": tid, "args": {"name": lane}})
    for s in tl.spans:
        events.append({"ph": "X", "name": s.name, "cat": s.kind, "pid": s.rank,
                       "tid": _LANE_TID.get(s.lane, len(_LANE_TID)),
                       "ts": s.start_s * 1e6, "dur": (s.end_s - s.start_s) * 1e6,
                       "args": {"kind": s.kind, "stage": s.stage, "micro_batch": s.micro_batch,
                                "lane": s.lane}})
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"traceEvents": events, "displayTimeUnit": "ms",
                   "otherData": {"makespan_s": tl.makespan_s}}, f)


def write_gantt(tl: Timeline, path: str | os.PathLike, title: str = "", unit: str = "GPU") -> None:
    """PNG Gantt chart: one row per rank x lane, colour by stage, micro-batch number on each bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows = [(r, lane) for r in tl.ranks for lane in (COMPUTE_LANE, COMM_LANE)]
    y = {row: i for i, row in enumerate(rows)}
    colours = plt.get_cmap("tab10").colors
    scale = 1e3  # ms
    fig, ax = plt.subplots(figsize=(12, 0.6 * len(rows) + 1.5))
    for s in tl.spans:
        yi = y.get((s.rank, s.lane))
        if yi is None:
            continue
        x0, w = s.start_s * scale, (s.end_s - s.start_s) * scale
        ax.broken_barh([(x0, w)], (yi - 0.4, 0.8), facecolors=colours[s.stage % len(colours)],
                       edgecolor="black", linewidth=0.3, alpha=0.6 if s.lane == COMM_LANE else 0.9)
        if w > tl.makespan_s * scale * 0.02:
            ax.text(x0 + w / 2, yi, str(s.micro_batch), ha="center", va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [f"{unit} {r} {lane}" for r, lane in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_xlim(0, max(tl.makespan_s * scale, 1e-9))
    stages = sorted({s.stage for s in tl.spans})
    ax.legend(handles=[Patch(color=colours[st % len(colours)], label=f"stage {st}") for st in stages],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title or f"makespan {fmt_s(tl.makespan_s)}, bubble {fmt_pct(tl.bubble_fraction)}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
