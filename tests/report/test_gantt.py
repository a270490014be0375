"""The Gantt chart: overlapping comm actions on separate sub-lanes, the titles and row labels."""

from __future__ import annotations

import matplotlib.pyplot as plt

from pyengine.core.timeline import Span, Timeline
from pyengine.report import gantt


def _comm(rank: int, name: str, start_ms: float, end_ms: float, mb: int = 0) -> Span:
    return Span(rank, "comm", name, "SEND", 0, mb, start_ms * 1e-3, end_ms * 1e-3)


def _overlapping_comm() -> list[Span]:
    """Rank 0 sends three micro-batches that overlap pairwise at most two at a time, then one alone."""
    return [_comm(0, "a", 0.0, 2.0, 0), _comm(0, "b", 1.0, 3.0, 1), _comm(0, "c", 2.0, 4.0, 2),
            _comm(0, "d", 2.5, 2.8, 3), _comm(0, "e", 5.0, 6.0, 4)]


def test_no_two_bars_on_one_sub_lane_overlap():
    spans = _overlapping_comm()
    lanes = gantt.sub_lanes(spans)
    for i, a in enumerate(spans):
        for j, b in enumerate(spans[:i]):
            if lanes[i] == lanes[j]:
                assert a.end_s <= b.start_s or b.end_s <= a.start_s, (a.name, b.name)
    # greedy colouring of intervals is optimal: as many sub-lanes as the most actions at once (3 at 2.5 ms)
    assert max(lanes) + 1 == 3
    assert lanes[spans.index(next(s for s in spans if s.name == "e"))] == 0  # reuses the first free one


def test_sequential_bars_share_one_lane():
    spans = [_comm(0, str(i), i, i + 1) for i in range(4)]  # touching, not overlapping
    assert gantt.sub_lanes(spans) == [0, 0, 0, 0]


def _figure_texts(fig) -> tuple[str, list[str], list[str]]:
    ax = fig.axes[0]
    return ax.get_title(), [t.get_text() for t in ax.get_yticklabels()], [t.get_text() for t in ax.texts]


def test_figure_rows_title_and_unit():
    compute = Span(0, "compute", "s0.mb0.COMPUTE", "COMPUTE", 0, 0, 0.0, 6e-3)
    tl = Timeline([compute, *_overlapping_comm()], 6e-3)
    fig = gantt.gantt_figure(tl, "pipeline variant, iteration 3 of 3, latency 6.00 ms", unit="rank")
    try:
        title, rows, bar_labels = _figure_texts(fig)
        assert title == "pipeline variant, iteration 3 of 3, latency 6.00 ms"
        assert rows == ["rank 0 compute", "rank 0 comm 1", "rank 0 comm 2", "rank 0 comm 3"]
        assert not any("GPU" in r for r in rows)
        assert sorted(bar_labels) == ["0", "0", "1", "2", "3", "4"]  # every bar wide enough is labelled
        # labels on one row never sit on top of each other: distinct x on each y
        at = [(round(t.get_position()[1]), t.get_position()[0]) for t in fig.axes[0].texts]
        assert len(at) == len(set(at))
    finally:
        plt.close(fig)


def test_default_title_names_makespan():
    tl = Timeline([_comm(1, "a", 0.0, 1.0)], 1e-3)
    fig = gantt.gantt_figure(tl)
    try:
        title, rows, _ = _figure_texts(fig)
        assert title.startswith("makespan") and rows == ["GPU 1 compute", "GPU 1 comm"]
    finally:
        plt.close(fig)


def test_run_chart_title_names_variant_iteration_and_latency():
    from types import SimpleNamespace

    from pyengine.report.run_view import chart_title

    v = SimpleNamespace(latency_iters_s=[5e-3, 7e-3, 6e-3], latency_p50_s=6e-3)
    title = chart_title(SimpleNamespace(backend="local", variants={"pipeline": v}))
    assert "pipeline variant" in title and "iteration 3 of 3" in title and "latency 6.00 ms" in title
    assert "local" in title
