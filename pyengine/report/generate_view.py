"""`pyengine generate` on the terminal: latency and throughput of prefill and decode, each beside
the simulator's replay and the roofline, the decode balance and the expert weight streaming."""

from __future__ import annotations

from pyengine.core.units import fmt_bytes
from pyengine.report.generate_summary import GenerateSummary
from pyengine.report.tables import console, print_table


def _ms(v: float | None) -> str:
    return "-" if v is None or v != v else f"{v * 1e3:.2f}"  # none, or NaN: no decode step to time


def print_generation(s: GenerateSummary) -> None:
    out = console(130)
    if s.scaled:
        out.print(f"[yellow]{s.scaled}[/yellow]", soft_wrap=True)
    roof = s.roofline or {}
    label = f"roofline ({s.profile})" if s.roofline else "roofline (no profile for this device)"
    rows = [["time to first token (prefill)", _ms(s.ttft_s), _ms(s.replayed.get("ttft_s")), _ms(roof.get("ttft_s"))],
            ["inter-token latency p50", _ms(s.itl_p50_s), _ms(s.replayed.get("itl_s")), _ms(roof.get("itl_s"))],
            ["inter-token latency p99", _ms(s.itl_p99_s), "-", "-"]]
    print_table(f"pyengine generate — backend {s.backend} on {s.device}: {s.sequences} sequences, "
                f"{s.prompt_tokens} prompt tokens, {s.new_tokens} new",
                [("figure", "left"), "measured (ms)", "replay of its op times (ms)", f"{label} (ms)"], rows, out)
    if s.new_tokens <= s.sequences:  # every new token came from the prefill: no decode step ran
        out.print("decode: no decode step ran (the prefill made each sequence's one new token)")
    else:
        out.print(f"decode: {s.decode_tokens_per_s:,.1f} tokens/s for the batch; busy per rank "
                  + ", ".join(f"rank {r}: {b:.0%}" for r, b in s.decode_busy.items())
                  + f"; attention busy / experts busy = {s.decode_balance:.2f}", soft_wrap=True)
    if s.weight_bytes_per_step:
        each = ", ".join(f"{s.backend.rank_unit} {r}: {fmt_bytes(b)} per step at {s.weight_gb_s[r]:.1f} GB/s"
                         for r, b in s.weight_bytes_per_step.items())
        out.print(f"expert weights streamed (the experts each micro-batch's tokens chose, per layer): {each}",
                  soft_wrap=True)
    if s.backend.shares_one_device:
        out.print("[dim]note: all ranks share one device here, so these figures test the engine, not a "
                  "3-GPU speed-up; `pyengine plan` gives the 3-GPU decode prediction.[/dim]")
    out.print(f"weights: {s.weights}")
    if s.graphs:
        out.print(f"decode steps: {s.graphs}")
