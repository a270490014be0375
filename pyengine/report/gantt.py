"""PNG Gantt chart of a timeline (matplotlib, headless)."""

from __future__ import annotations

import os

from pyengine.core.timeline import COMM_LANE, COMPUTE_LANE, Timeline
from pyengine.core.units import fmt_pct, fmt_s


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
