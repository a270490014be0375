"""PNG Gantt chart of a timeline (matplotlib, headless)."""

from __future__ import annotations

import os

from pyengine.core.timeline import COMM_LANE, COMPUTE_LANE, Span, Timeline
from pyengine.core.units import fmt_pct, fmt_s


def sub_lanes(spans: list[Span]) -> list[int]:
    """Greedy interval colouring: each span gets the lowest sub-lane whose last bar has ended by
    its start, so bars that overlap in time (concurrent comm actions) sit on separate rows."""
    lane_ends: list[float] = []
    out = [0] * len(spans)
    for i in sorted(range(len(spans)), key=lambda j: (spans[j].start_s, spans[j].end_s)):
        s = spans[i]
        free = next((k for k, end in enumerate(lane_ends) if end <= s.start_s), None)
        if free is None:
            free = len(lane_ends)
            lane_ends.append(s.end_s)
        lane_ends[free] = s.end_s
        out[i] = free
    return out


def _rows(tl: Timeline) -> tuple[list[tuple[int, str, int]], dict[int, tuple[int, str, int]]]:
    """One row per rank x lane x sub-lane; the row of each span (by index in tl.spans)."""
    row_of: dict[int, tuple[int, str, int]] = {}
    rows = []
    for r in tl.ranks:
        for lane in (COMPUTE_LANE, COMM_LANE):
            idx = [i for i, s in enumerate(tl.spans) if s.rank == r and s.lane == lane]
            subs = sub_lanes([tl.spans[i] for i in idx])
            for i, k in zip(idx, subs):
                row_of[i] = (r, lane, k)
            rows += [(r, lane, k) for k in range(max(subs, default=0) + 1)]
    return rows, row_of


def _row_label(unit: str, rank: int, lane: str, sub: int, subs: int) -> str:
    return f"{unit} {rank} {lane}" + (f" {sub + 1}" if subs > 1 else "")


def gantt_figure(tl: Timeline, title: str = "", unit: str = "GPU"):
    """The chart as a matplotlib Figure: one row per rank x lane (comm split into sub-lanes where
    actions overlap), colour by stage, micro-batch number on each bar wide enough to hold it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    rows, row_of = _rows(tl)
    y = {row: i for i, row in enumerate(rows)}
    colours = plt.get_cmap("tab10").colors
    scale = 1e3  # ms
    fig, ax = plt.subplots(figsize=(12, 0.45 * len(rows) + 1.5))
    for i, s in enumerate(tl.spans):
        if i not in row_of:
            continue  # a rank outside tl.ranks
        yi = y[row_of[i]]
        x0, w = s.start_s * scale, (s.end_s - s.start_s) * scale
        ax.broken_barh([(x0, w)], (yi - 0.4, 0.8), facecolors=colours[s.stage % len(colours)],
                       edgecolor="black", linewidth=0.3, alpha=0.6 if s.lane == COMM_LANE else 0.9)
        if w > tl.makespan_s * scale * 0.02:
            ax.text(x0 + w / 2, yi, str(s.micro_batch), ha="center", va="center", fontsize=7)
    count = {(r, lane): sum(1 for rr, ll, _ in rows if (rr, ll) == (r, lane)) for r, lane, _ in rows}
    ax.set_yticks(range(len(rows)), [_row_label(unit, r, lane, k, count[(r, lane)]) for r, lane, k in rows])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_xlim(0, max(tl.makespan_s * scale, 1e-9))
    stages = sorted({s.stage for s in tl.spans})
    ax.legend(handles=[Patch(color=colours[st % len(colours)], label=f"stage {st}") for st in stages],
              loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    ax.set_title(title or f"makespan {fmt_s(tl.makespan_s)}, bubble {fmt_pct(tl.bubble_fraction)}")
    fig.tight_layout()
    return fig


def write_gantt(tl: Timeline, path: str | os.PathLike, title: str = "", unit: str = "GPU") -> None:
    """Write gantt_figure(tl, title, unit) as a PNG."""
    import matplotlib.pyplot as plt

    fig = gantt_figure(tl, title, unit)
    fig.savefig(path, dpi=110)
    plt.close(fig)
