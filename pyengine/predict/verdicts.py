"""The seed note's claims as verdicts: a table of checks, one per claim, each naming the
predicted figure and whether the claim holds (the figures' definitions:
pyengine.predict.prediction and pyengine.predict.resources)."""

from __future__ import annotations

from collections.abc import Callable

from pyengine.core import claims
from pyengine.core.claims import Claim
from pyengine.core.units import fmt_bytes, fmt_flops, fmt_pct, fmt_s, fmt_signed_pct, fmt_split
from pyengine.predict.plan import Plan, Verdict
from pyengine.predict.prediction import predict


def _state(holds: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: "holds only in part"}[holds]


def _balance(p: Plan) -> Verdict:
    c, lb, dev = claims.BALANCE, p.load_balance, p.device.name
    flop_list = ", ".join(f"GPU {g.index} {fmt_flops(g.flops)}" for g in p.gpus)
    holds = lb["max_diff_pct"] <= c.target + 1e-9
    fix = ""
    if not holds and p.balanced_fractions:
        fr = "/".join(f"{f:.3f}" for f in p.balanced_fractions.values())
        fix = (f" Balancing predicted busy time on {dev} needs the experts on GPUs "
               f"{list(p.balanced_fractions)} with F fractions {fr}.")
    return Verdict(
        c.label, f"FLOP shares {fmt_split(lb['shares'])} (max diff {lb['max_diff_pct']:.1f} pp)", holds,
        f"Claim '{c.quote}': FLOP shares are {fmt_split(lb['shares'])} ({flop_list}), max difference "
        f"{lb['max_diff_pct']:.1f} pp; predicted busy-time shares on {dev} are "
        f"{fmt_split(lb['busy_shares'])} (max diff {lb['busy_max_diff_pct']:.1f} pp) -- {_state(holds)}.{fix}")


def _memory_split(p: Plan) -> Verdict:
    c = claims.MEMORY_SPLIT
    shares = [g.memory_share for g in p.gpus]
    holds = 100 * (max(shares) - min(shares)) <= c.target + 1e-9
    each = ", ".join(f"GPU {g.index} {fmt_bytes(g.weight_bytes + g.activation_bytes)}" for g in p.gpus)
    return Verdict(c.label, f"memory shares {fmt_split(shares)}", holds,
                   f"Claim '{c.quote}': weights + activations split {fmt_split(shares)} ({each})"
                   f" -- {_state(holds)}.")


def _module_division(p: Plan) -> Verdict:
    c = claims.MODULE_DIVISION
    counts = [len(g.parts) for g in p.gpus]
    holds = counts == [int(c.target)] * len(p.gpus)
    desc = "; ".join(f"GPU {g.index}: {' + '.join(g.parts)}" for g in p.gpus)
    per = "/".join(map(str, counts))
    return Verdict(c.label, f"{sum(counts)} parts, {per} per GPU", holds,
                   f"Claim '{c.quote}': this stage map has {sum(counts)} parts ({desc}), {per} per GPU "
                   f"-- {_state(holds)}.")


def _fits(p: Plan) -> Verdict:
    cap = p.spec.hardware.gpu_memory_gb
    worst = max(p.gpus, key=lambda g: g.memory_fraction)
    tail = ("fits on every GPU." if p.fits else
            "does not fit: " + ", ".join(f"GPU {g.index} ({fmt_bytes(g.memory_bytes)})"
                                         for g in p.gpus if not g.fits) + " overflow.")
    kv = f" + KV cache {fmt_bytes(worst.kv_cache_bytes)}" if worst.kv_cache_bytes else ""
    if p.layers_fit is not None and not p.fits:
        tail += (f" At most {p.layers_fit} of its {p.spec.model.layers} layers fit this layout"
                 if p.layers_fit else " Not one layer fits this layout")
        tail += "; more GPUs for the experts, or experts on GPU 0 too, hold more."
    return Verdict(
        f"fits in {cap:g} GB per GPU", f"largest GPU {worst.index}: {fmt_bytes(worst.memory_bytes)}",
        p.fits,
        f"Memory: the largest GPU (GPU {worst.index}) needs {fmt_bytes(worst.memory_bytes)} "
        f"(weights {fmt_bytes(worst.weight_bytes)} + activations {fmt_bytes(worst.activation_bytes)}{kv} "
        f"+ reserved {p.device.reserved_gb:g} GB) of {cap:g} GB -- " + tail)


def _ping_pong(p: Plan) -> Verdict | None:
    pp = p.ping_pong
    if pp is None:
        return None
    m = p.spec.schedule.micro_batches
    lat, _, _ = pp.by_m[m] if m in pp.by_m else (p.predicted.latency_s, 0, 0)
    best_lat, best_thr, best_bal = pp.by_m[pp.best_m]
    side = ("the experts bound it" if pp.bound_by == "experts" else "the attention GPU bounds it")
    factor = 1 / pp.balance if pp.bound_by == "experts" else pp.balance
    return Verdict(
        "attention-expert balance", f"{pp.balance:.2f} (attention / experts busy)", pp.best_m == m,
        f"Disaggregation (ping-pong over {p.spec.model.layers} layers): per batch the attention side is "
        f"busy {fmt_s(pp.attention_s)}, the busiest expert GPU {fmt_s(pp.experts_s)}: {side} by "
        f"{factor:.2f}x. At m={m}: {fmt_s(lat)}; the lowest predicted latency is at m={pp.best_m}: "
        f"{fmt_s(best_lat)}, {best_thr:,.0f} tokens/s, balance {best_bal:.2f} "
        "(more micro-batches overlap the two sides, but every expert re-streams its weights once per "
        "micro-batch and layer).")


def _mlp_placement(p: Plan) -> Verdict | None:
    mp = p.mlp_placement
    if mp is None or len(mp.options) < 2:
        return None
    by = {o.where: o for o in mp.options}
    best, other = by[mp.fastest], next(o for o in mp.options if o.where != mp.fastest)
    gain = 1 - best.latency_s / other.latency_s if other.latency_s else 0.0
    also = ("it also balances the ping-pong better" if mp.balanced == mp.fastest else
            f"'{mp.balanced}' balances the two sides better (balance {by[mp.balanced].balance:.2f}) but is slower")
    return Verdict(
        "dense MLP placement", f"{mp.fastest}: {fmt_s(best.latency_s)} vs {fmt_s(other.latency_s)}",
        mp.fastest == mp.this,
        f"Shared expert / dense layers: on the {mp.fastest} GPU(s) the batch is predicted {fmt_pct(gain)} faster "
        f"({fmt_s(best.latency_s)} vs {fmt_s(other.latency_s)}; decode step {fmt_s(best.decode_step_s)} vs "
        f"{fmt_s(other.decode_step_s)}); {also}. This config places them on '{mp.this}'"
        + ("." if mp.fastest == mp.this else f": set parallel.dense_mlp_placement to \"{mp.fastest}\"."))


def _latency(p: Plan) -> Verdict:
    pred, (single, m1) = p.predicted, _baselines(p)
    cuts = {b.name: 1 - pred.latency_s / b.latency_s for b in (single, m1)}
    return _vs_baselines(
        claims.LATENCY_CUT, cuts,
        f"Claim '{claims.LATENCY_CUT.quote}': predicted latency {fmt_s(pred.latency_s)} on "
        f"{p.device.name} vs {fmt_s(single.latency_s)} single GPU"
        f"{'' if single.fits else ' (which does not fit)'} ({fmt_signed_pct(-cuts[single.name])}) and "
        f"{fmt_s(m1.latency_s)} pipeline m=1 without overlap ({fmt_signed_pct(-cuts[m1.name])})")


def _throughput(p: Plan) -> Verdict:
    pred, (single, m1) = p.predicted, _baselines(p)
    gains = {b.name: pred.throughput_tokens_per_s / b.throughput_tokens_per_s - 1 for b in (single, m1)}
    return _vs_baselines(
        claims.THROUGHPUT_GAIN, gains,
        f"Claim '{claims.THROUGHPUT_GAIN.quote}': predicted steady-state "
        f"{pred.throughput_tokens_per_s:,.0f} tokens/s vs {single.throughput_tokens_per_s:,.0f} single GPU "
        f"({fmt_signed_pct(gains[single.name])}) and {m1.throughput_tokens_per_s:,.0f} pipeline m=1 "
        f"without overlap ({fmt_signed_pct(gains[m1.name])})")


def _utilisation(p: Plan) -> Verdict:
    c, pred = claims.UTILIZATION, p.predicted
    holds = pred.steady_state_utilization >= c.target
    return Verdict(
        c.label,
        f"{fmt_pct(pred.utilization)} over one batch, {fmt_pct(pred.steady_state_utilization)} steady state",
        holds,
        f"Claim '{c.quote}': predicted busy fraction {fmt_pct(pred.utilization)} over one batch "
        f"(bubble {fmt_pct(pred.bubble_fraction)}) and {fmt_pct(pred.steady_state_utilization)} in "
        f"steady state (mean busy / bottleneck period); MFU {fmt_pct(pred.mfu)} of peak -- {_state(holds)}.")


def _bubble_cut(p: Plan) -> Verdict:
    c, pred = claims.BUBBLE_CUT, p.predicted
    m1_bubble = predict(p.spec.replace(schedule={"micro_batches": 1}), p.device)[0].bubble_fraction
    cut = 1 - pred.bubble_fraction / m1_bubble if m1_bubble > 0 else 0.0
    holds = cut >= c.target
    return Verdict(
        c.label, f"bubble {fmt_pct(pred.bubble_fraction)} vs {fmt_pct(m1_bubble)} at m=1", holds,
        f"Claim '{c.quote}' (from m={p.spec.schedule.micro_batches} micro-batches): bubble "
        f"{fmt_pct(pred.bubble_fraction)} vs {fmt_pct(m1_bubble)} with m=1 (same overlap), a "
        f"{fmt_pct(cut)} relative cut -- {_state(holds)}.")


def _baselines(p: Plan):
    by = {b.name: b for b in p.baselines}
    return by["single_gpu"], by["pipeline_m1_no_overlap"]


def _vs_baselines(claim: Claim, got: dict[str, float], text: str) -> Verdict:
    ok = {k: v >= claim.target for k, v in got.items()}
    holds: bool | None = True if all(ok.values()) else (False if not any(ok.values()) else None)
    extra = "" if holds is not None else f" (only against {', '.join(k for k, v in ok.items() if v)})"
    figure = ", ".join(f"{fmt_signed_pct(v)} vs {k}" for k, v in got.items())
    return Verdict(claim.label, figure, holds, f"{text} -- {_state(holds)}{extra}.")


def _layout(p: Plan) -> Verdict:
    """Was the spec's experts layout the right one for its own model? Against the alternatives
    at the same micro-batches and schedule (TP vs EP, EP with the router's GPU holding experts)."""
    this, *alts = p.layouts
    beats = [o for o in alts if o.latency_s < this.latency_s and o.throughput_tokens_per_s > this.throughput_tokens_per_s]
    mixed = [o for o in alts if o not in beats and (o.latency_s < this.latency_s
                                                   or o.throughput_tokens_per_s > this.throughput_tokens_per_s)]
    holds: bool | None = False if beats else (None if mixed else True)
    rows = "; ".join(f"{o.label}: {fmt_s(o.latency_s)}, {o.throughput_tokens_per_s:,.0f} tok/s" for o in alts)
    state = {True: "the right choice among these", False: f"not the right choice ({beats[0].label if beats else ''} "
             "is faster and has more throughput)", None: "faster on one figure, slower on the other"}[holds]
    return Verdict(
        f"layout: {this.label}", f"{fmt_s(this.latency_s)}, {this.throughput_tokens_per_s:,.0f} tok/s", holds,
        f"Layout '{this.label}' predicts {fmt_s(this.latency_s)} and {this.throughput_tokens_per_s:,.0f} "
        f"tokens/s on {p.device.name}, routing {p.routing.get('source', 'uniform')}; at the same m and "
        f"schedule: {rows or 'no alternative'} -- {state}.")


def _decode(p: Plan) -> Verdict | None:
    d = p.decode
    if d is None:
        return None
    own = next(t for _, t, this in d.layouts if this)
    best_label, best_t, best_this = min(d.layouts, key=lambda x: x[1])
    streamed = ", ".join(f"GPU {r} {fmt_bytes(b)}" for r, b in d.weight_bytes_per_step.items())
    layouts = "; ".join(f"{label}: {fmt_s(t)}" for label, t, _ in d.layouts)
    m = min(p.spec.schedule.micro_batches, p.spec.model.batch_size)  # never more groups than sequences
    return Verdict(
        "decode layout and groups", f"{fmt_s(d.mean_step_s)} per step", best_this and d.best_groups == m,
        f"Decode ({d.new_tokens} new tokens after the prompts, {p.spec.model.batch_size} sequences in "
        f"groups of m={m}): one step takes {fmt_s(d.first_step_s)} at first and {fmt_s(d.last_step_s)} "
        f"at the last position (the KV cache grows), {d.tokens_per_s:,.1f} tokens/s; expert weights "
        f"streamed per step: {streamed}. Fastest group count: m={d.best_groups} "
        f"({fmt_s(d.by_groups[d.best_groups])} per step; every extra group re-streams the experts its "
        f"tokens touch). Layouts for decode: {layouts} -- "
        + ("this config's layout is the right one for decode." if best_this else
           f"{best_label} decodes {own / best_t - 1:.0%} faster."))


def _host(p: Plan) -> Verdict | None:
    """Host time of a decode step beside its device time, eager and graphed, per rank."""
    h = p.decode.host if p.decode is not None else None
    if h is None:
        return None
    ranks = "; ".join(f"GPU {r}: {x.actions} actions, {x.kernels} kernels -> host {fmt_s(x.eager_s)} eager "
                      f"({x.bound(False)}), {fmt_s(x.graphed_s)} graphed ({x.bound(True)}), device "
                      f"{fmt_s(x.device_s)}" for r, x in h.ranks.items())
    src = "; ".join(f"{f} {getattr(p.device, f):g} us ({p.device.sources.get(f, 'uncalibrated')})"
                    for f in ("host_launch_us", "action_host_us", "graph_replay_us"))
    bound = [r for r, x in h.ranks.items() if x.bound(True) == "host-bound"]
    return Verdict(
        "decode host time", f"eager {fmt_s(h.step_s(False))}, graphed {fmt_s(h.step_s(True))} per step",
        not bound,
        f"One decode step at the mean position: device {fmt_s(h.device_step_s)} (simulated); with the host's "
        f"time per rank it takes {fmt_s(h.step_s(False))} eager and {fmt_s(h.step_s(True))} with CUDA graphs. "
        f"{ranks}. " + (f"Graphed decode is still host-bound on GPU(s) {bound}." if bound else
                        "With graphs every rank is device-bound.") + f" Host costs: {src}.")


CHECKS: tuple[Callable[[Plan], Verdict | None], ...] = (
    _balance, _memory_split, _module_division, _fits, _latency, _throughput, _utilisation, _bubble_cut,
    _layout, _ping_pong, _mlp_placement, _decode, _host)
"""One check per claim, in the order `plan` prints them (None: does not apply to this model)."""


def verdicts(p: Plan) -> list[Verdict]:
    return [v for v in (check(p) for check in CHECKS) if v is not None]
