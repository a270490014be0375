"""`pyengine run`'s claim verdicts on a noisy machine: a spread over iterations that straddles the
seed figure gives no verdict; a tight one gives one. Constructed per-iteration latencies."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pyengine.core import claims
from pyengine.report import run_view
from pyengine.report.run_summary import headline_claims, verdict_of

TOKENS = 1000


def _runs(pipeline_ms: list[float], single_ms: list[float], utilization: float = 0.5):
    pipe_s, single_s = [x * 1e-3 for x in pipeline_ms], [x * 1e-3 for x in single_ms]
    p50 = float(np.median(pipe_s)), float(np.median(single_s))
    # the stream overlaps batches: twice the throughput one batch's latency gives
    p = SimpleNamespace(latency_p50_s=p50[0], latency_iters_s=pipe_s, throughput_tokens_per_s=2 * TOKENS / p50[0],
                        measured={"utilization": utilization})
    s = SimpleNamespace(latency_p50_s=p50[1], latency_iters_s=single_s, throughput_tokens_per_s=TOKENS / p50[1])
    return {c.claim: c for c in headline_claims(p, s)}


def test_wide_spread_is_too_noisy_for_a_verdict():
    # the same config: the pipeline took 2-10 ms against a steady 10 ms, so the cut is 0-80% per iteration
    out = _runs([2, 10, 4, 9, 3, 8, 5, 10, 6, 4], [10] * 10)
    cut = out[claims.LATENCY_CUT.key]
    assert cut.spread[0] < claims.LATENCY_CUT.target < cut.spread[1]
    assert cut.holds is None
    line = run_view.claim_line(cut)
    assert "too noisy for a verdict" in line and "p10–p90" in line and "10 iterations" in line
    assert "holds" not in line


@pytest.mark.parametrize("pipeline_ms, holds", [([5.0, 5.1, 4.9, 5.2, 5.0], True),
                                                 ([9.0, 9.1, 8.9, 9.2, 9.0], False)])
def test_tight_spread_gives_a_verdict(pipeline_ms, holds):
    cut = _runs(pipeline_ms, [10.0] * 5)[claims.LATENCY_CUT.key]
    assert cut.holds is holds
    assert not (cut.spread[0] < cut.seed_figure < cut.spread[1])
    assert run_view.claim_line(cut).endswith(f"→ {run_view.VERDICTS[holds]} on this backend")


def test_every_ratio_shows_its_spread():
    out = _runs([5.0, 6.0, 5.5], [10.0, 10.5, 9.5], utilization=0.99)
    for key in (claims.LATENCY_CUT.key, claims.THROUGHPUT_GAIN.key):
        assert out[key].spread is not None and out[key].iterations == 3
        assert "p10–p90" in run_view.claim_line(out[key])
    gain = out[claims.THROUGHPUT_GAIN.key]  # the stream's figure lies inside its own spread
    assert gain.spread[0] <= gain.measured <= gain.spread[1] and gain.spread[0] < gain.spread[1]
    util = out[claims.UTILIZATION.key]  # one timeline: a verdict by its figure, said to have no spread
    assert util.spread is None and util.holds is True
    assert "no spread" in run_view.claim_line(util)


def test_verdict_of_edges():
    assert verdict_of(0.5, 0.4, (0.41, 0.6)) is True
    assert verdict_of(0.3, 0.4, (0.2, 0.39)) is False
    assert verdict_of(0.45, 0.4, (0.3, 0.6)) is None
    assert verdict_of(0.45, 0.4, None) is True


def test_run_table_says_what_exposed_comm_sums(capsys):
    assert "summed over the ranks" in run_view.EXPOSED_COMM_NOTE
    from pyengine.report.tables import print_table

    print_table("t", ["exposed comm (ms)*"], [["1.0"]], caption=run_view.EXPOSED_COMM_NOTE)
    assert "summed" in capsys.readouterr().out
