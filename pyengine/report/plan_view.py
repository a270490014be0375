"""`pyengine plan` / `simulate` on the terminal: per-GPU and per-stage tables, verdicts, the search."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pyengine.core.timeline import Timeline
from pyengine.core.units import fmt_bytes, fmt_flops, fmt_pct, fmt_s
from pyengine.predict.device_profile import number_fields
from pyengine.report.tables import console, print_table

if TYPE_CHECKING:
    from rich.console import Console

    from pyengine.predict.device_profile import DeviceProfile
    from pyengine.predict.plan import Plan
    from pyengine.predict.search import Candidate


def print_plan(p: Plan, device_note: str = "", out: Console | None = None) -> None:
    out = out or console()
    spec, dev = p.spec, p.device
    link = dev.link(spec.hardware.interconnect)[0] / dev.link_efficiency / 1e9
    out.print(f"device profile: {dev.name}{device_note} -- peak {dev.peak_tflops_bf16:g} TFLOP/s bf16, "
              f"{dev.hbm_gb_s:g} GB/s HBM, {spec.hardware.interconnect} {link:g} GB/s/dir; efficiency "
              f"HBM {dev.hbm_efficiency:.3g}, link {dev.link_efficiency:.3g}, dense GEMM {dev.gemm_efficiency:.3g}, "
              f"grouped GEMM {dev.grouped_gemm_efficiency:.3g} x m/(m + {dev.grouped_gemm_half_rows:g}) "
              f"at m rows per expert; launch {dev.kernel_launch_us:g} us, collective "
              f"{dev.collective_base_us:g} us + {dev.collective_step_us:g} us/step", soft_wrap=True)
    print_sources(dev, out)
    boundary = "combine (expert parallel)" if spec.expert_parallel else spec.comm.boundary
    out.print(f"config: {spec.schedule.kind}, m={spec.schedule.micro_batches}, boundary {boundary}, "
              f"overlap {'on' if spec.comm.overlap else 'off'}, T={spec.model.tokens} tokens, {spec.model.dtype}")
    r = p.routing
    if r and (spec.expert_parallel or r["source"] != "uniform"):
        loads = "/".join(f"{100 * x:.1f}" for x in r["expert_loads"])
        out.print(f"routing: {r['source']}; per-expert share of pairs {loads}% "
                  f"(busiest expert {r['imbalance']:.2f}x the mean)", soft_wrap=True)
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
    if p.mlp_placement is not None:
        out.print("Shared expert / dense layers, placed (parallel.dense_mlp_placement):")
        for o in p.mlp_placement.options:
            this = " (this config)" if o.where == p.mlp_placement.this else ""
            out.print(f"  {o.where:<9}{this}: batch {fmt_s(o.latency_s)}, decode step {fmt_s(o.decode_step_s)}; "
                      f"busy attention {fmt_s(o.attention_s)}, experts {fmt_s(o.experts_s)}, balance {o.balance:.2f}",
                      soft_wrap=True)
    out.print("Verdicts:")
    for v in p.verdicts:
        mark = {True: "[green]HOLDS[/]", False: "[red]DOES NOT HOLD[/]", None: "[yellow]PARTLY[/]"}[v.holds]
        out.print(f"  {mark}  {v.text}", soft_wrap=True)


def print_sources(dev: DeviceProfile, out: Console) -> None:
    """Where the profile's numbers come from: one line per source, naming the numbers it backs."""
    by_source: dict[str, list[str]] = {}
    for name in number_fields():
        by_source.setdefault(str(dev.source(name)), []).append(name)
    where = f" (measured: {', '.join(f'{k} {v}' for k, v in dev.provenance.items())})" if dev.provenance else ""
    out.print(f"profile sources{where}:", soft_wrap=True)
    for source, names in by_source.items():
        out.print(f"  {', '.join(names)} -- {source}", soft_wrap=True, markup=False)


def _peers(d: dict[int, float], arrow: str) -> str:
    return ", ".join(f"{arrow}{p} {fmt_bytes(b)}" for p, b in d.items()) or "-"


def print_candidates(cands: Sequence[Candidate], top: int = 10, out: Console | None = None) -> None:
    out = out or console()
    shown = list(cands[:top])
    seed = next((c for c in cands if c.is_seed), None)
    if seed is not None and seed not in shown:
        shown.append(seed)
    tried = getattr(cands, "considered", None)
    how = (f" ({tried['tensor']} tensor-parallel, {tried['expert']} expert-parallel from "
           f"{tried['expert_count_vectors']} expert-count vectors)" if tried else "")
    print_table(
        f"Plan search: {len(cands)} valid candidates{how}, top {min(top, len(cands))} "
        f"(+ your config for reference); '*' = Pareto-optimal in latency and throughput",
        ["#lat", "#thr", ("candidate", "left"), "latency", "tok/s", "bubble", ("why (vs your config)", "left")],
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
