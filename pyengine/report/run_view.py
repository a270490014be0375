"""`pyengine run` on the terminal: the variants table, busy and balance lines, claims, the check."""

from __future__ import annotations

from pyengine.core import claims
from pyengine.core.units import fmt_bytes
from pyengine.report.run_summary import ClaimResult, RunSummary
from pyengine.report.tables import console, print_table


EXPOSED_COMM_NOTE = ("* exposed comm: each rank's comm time not overlapped by its own compute, summed "
                     "over the ranks (last timed iteration), so it can exceed the latency")
VERDICTS = {True: "holds", False: "does not hold", None: "too noisy for a verdict"}


def _fmt_claim(claim: str, x: float) -> str:
    return f"{x:.1%}" if claim == "utilization" else f"{x:+.1%}"  # a level, or a change


def claim_line(c: ClaimResult) -> str:
    """One claim: the measured figure, its p10-p90 spread over iterations, the verdict."""
    if c.spread is None:
        spread = "one timeline, no spread over iterations"
    else:
        lo, hi = (_fmt_claim(c.claim, x) for x in c.spread)
        # the stream is timed once: its spread is the batches' latency noise (run_summary._per_iteration)
        per = ", from the batch latencies" if c.claim == claims.THROUGHPUT_GAIN.key else ""
        spread = f"p10–p90 over {c.iterations} iterations{per} {lo} … {hi}"
    return (f"seed claim {c.claim} ≥ {c.seed_figure:.0%}: measured {_fmt_claim(c.claim, c.measured)} "
            f"({spread}) → {VERDICTS[c.holds]} on this backend")


def chart_title(summary: RunSummary, variant: str = "pipeline") -> str:
    """The Gantt chart's title: which variant, which iteration the timeline is, and its latency."""
    v = summary.variants[variant]
    n = len(v.latency_iters_s)
    return (f"pyengine run ({summary.backend}, measured): {variant} variant, iteration {n} of {n}, "
            f"latency {v.latency_iters_s[-1] * 1e3:.2f} ms (p50 over iterations "
            f"{v.latency_p50_s * 1e3:.2f} ms)")


def print_summary(summary: RunSummary) -> None:
    out = console(130)
    if summary.scaled:
        out.print(f"[yellow]{summary.scaled}[/yellow]", soft_wrap=True)
    rows = []
    for name, v in summary.variants.items():
        m, p = v.measured, v.predicted_from_measured_ops
        rows.append([name, f"{v.latency_p50_s * 1e3:.2f}", f"{v.latency_p99_s * 1e3:.2f}",
                     f"{v.throughput_tokens_per_s:,.0f}", f"{m['utilization']:.0%}",
                     f"{m['bubble_fraction']:.0%}", f"{p['bubble_fraction']:.0%}",
                     f"{m['hidden_comm_fraction']:.0%}", f"{m['exposed_comm_total_s'] * 1e3:.2f}"])
    s = summary.single
    rows.append(["single device", f"{s.latency_p50_s * 1e3:.2f}", f"{s.latency_p99_s * 1e3:.2f}",
                 f"{s.throughput_tokens_per_s:,.0f}", "-", "-", "-", "-", "-"])
    print_table(f"pyengine run — backend {summary.backend} on {summary.device}, "
                f"{summary.tokens_per_batch} tokens/batch",
                [("variant", "left"), "latency p50 (ms)", "p99 (ms)", "tokens/s", "utilization",
                 "bubble meas.", "bubble sim.", "comm hidden", "exposed comm (ms)*"], rows, out,
                caption=EXPOSED_COMM_NOTE)
    p = summary.variants["pipeline"]
    busy = ", ".join(f"rank {r}: {b:.0%}" for r, b in p.measured["busy"].items())
    shares = ", ".join(f"rank {r}: {b:.0%}" for r, b in p.load_balance["shares"].items())
    out.print(f"busy per rank: {busy}")
    out.print(f"measured compute shares: {shares} (max difference "
              f"{p.load_balance['max_diff_pct']:.1f} points; the seed claims 33/33/34, 1 point)")
    pp = summary.ping_pong
    if pp is not None:
        each = ", ".join(f"rank {r}: {pp.busy_s[r] * 1e3:.1f} ms busy / {pp.idle_s[r] * 1e3:.1f} ms idle"
                         for r in pp.busy_s)
        pred = (f", roofline on {pp.profile} {pp.balance_predicted:.2f}" if pp.balance_predicted is not None
                else "")
        out.print(f"ping-pong: attention busy / experts busy = {pp.balance:.2f} measured (replay "
                  f"{pp.balance_replayed:.2f}{pred}); {each}", soft_wrap=True)
    r = summary.routing
    if r is not None:
        per_gpu = ", ".join(f"{summary.backend.rank_unit} {g}: {sum(v)} pairs (uniform {sum(r.gpu_pairs_predicted[g]):.0f})"
                            for g, v in r.gpu_pairs.items())
        out.print(f"routing: busiest expert {r.imbalance:.2f}x the mean; expert-stage load {per_gpu}",
                  soft_wrap=True)
    for c in summary.claims:
        out.print(claim_line(c), soft_wrap=True)
    if summary.backend.shares_one_device:
        out.print("[dim]note: all ranks share one device here, so these figures test the engine, "
                  "not a 3-GPU speed-up; see `pyengine plan` for the 3-GPU prediction.[/dim]")
    if any(summary.read_bytes.values()):
        per_rank = ", ".join(f"rank {r}: {fmt_bytes(b)}" for r, b in summary.read_bytes.items())
        out.print(f"weights: {summary.weights}; read per rank (its slices only): {per_rank}; the output "
                  f"check read the whole block once more on the output rank "
                  f"({fmt_bytes(summary.check_read_bytes)})", soft_wrap=True)
    ck = summary.check
    colour = "green" if ck.ok else "red"
    out.print(f"[{colour}]output check vs single-device reference: max |err| {ck.max_abs_err:.3g}, "
              f"#wrong {ck.wrong} of {ck.elements} (atol {ck.atol:g}, rtol {ck.rtol:g})[/{colour}]")
