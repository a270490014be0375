"""The seed note's claims as verdicts: one sentence per claim naming the predicted figure and
whether it holds (definitions of every figure: pyengine.planner's docstring)."""

from __future__ import annotations

from pyengine.devices import DeviceProfile
from pyengine.planner import SEED_CLAIMS, Plan, Verdict, predict
from pyengine.report import fmt_bytes, fmt_flops, fmt_s, fmt_signed_pct
from pyengine.spec import DeploymentSpec


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _ms(x: float) -> str:
    return fmt_s(x)


def _split(values: list[float]) -> str:
    return "/".join(f"{100 * v:.1f}" for v in values) + "%"


def _state(holds: bool | None) -> str:
    return {True: "holds", False: "does not hold", None: "holds only in part"}[holds]


def verdicts(p: Plan) -> list[Verdict]:
    """One sentence per claim of the seed note: the claim, the predicted figure, holds or not."""
    out: list[Verdict] = []
    spec, gpus, pred = p.spec, p.gpus, p.predicted
    lb = p.load_balance
    dev = p.device.name
    flop_list = ", ".join(f"GPU {g.index} {fmt_flops(g.flops)}" for g in gpus)
    holds = lb["max_diff_pct"] <= SEED_CLAIMS["balance_max_diff_pp"] + 1e-9
    fix = ""
    if not holds and p.balanced_fractions:
        fr = "/".join(f"{f:.3f}" for f in p.balanced_fractions.values())
        fix = (f" Balancing predicted busy time on {dev} needs the experts on GPUs "
               f"{list(p.balanced_fractions)} with F fractions {fr}.")
    out.append(Verdict(
        "load balance 33/33/34%, max difference 1%",
        f"FLOP shares {_split(lb['shares'])} (max diff {lb['max_diff_pct']:.1f} pp)",
        holds,
        f"Claim 'load balance 33/33/34%, max difference 1%': FLOP shares are {_split(lb['shares'])} "
        f"({flop_list}), max difference {lb['max_diff_pct']:.1f} pp; predicted busy-time shares on "
        f"{dev} are {_split(lb['busy_shares'])} (max diff {lb['busy_max_diff_pct']:.1f} pp) "
        f"-- {_state(holds)}.{fix}"))
    mem_shares = [g.memory_share for g in gpus]
    mem_diff = 100 * (max(mem_shares) - min(mem_shares))
    holds = mem_diff <= SEED_CLAIMS["balance_max_diff_pp"] + 1e-9
    out.append(Verdict(
        "memory 33/33/34%",
        f"memory shares {_split(mem_shares)}",
        holds,
        f"Claim 'memory usage 33/33/34%': weights + activations split {_split(mem_shares)} "
        f"({', '.join(f'GPU {g.index} {fmt_bytes(g.weight_bytes + g.activation_bytes)}' for g in gpus)})"
        f" -- {_state(holds)}."))
    counts = [len(g.parts) for g in gpus]
    holds = counts == [1] * len(gpus)
    desc = "; ".join(f"GPU {g.index}: {' + '.join(g.parts)}" for g in gpus)
    out.append(Verdict(
        "module division: 3 parts, 1 per GPU",
        f"{sum(counts)} parts, {'/'.join(map(str, counts))} per GPU",
        holds,
        f"Claim 'module division: 3 parts for 3 GPUs, 1 each': this stage map has {sum(counts)} parts "
        f"({desc}), {'/'.join(map(str, counts))} per GPU -- {_state(holds)}."))
    worst = max(gpus, key=lambda g: g.memory_fraction)
    out.append(Verdict(
        f"fits in {spec.hardware.gpu_memory_gb:g} GB per GPU",
        f"largest GPU {worst.index}: {fmt_bytes(worst.memory_bytes)}",
        p.fits,
        f"Memory: the largest GPU (GPU {worst.index}) needs {fmt_bytes(worst.memory_bytes)} "
        f"(weights {fmt_bytes(worst.weight_bytes)} + activations {fmt_bytes(worst.activation_bytes)} "
        f"+ reserved {p.device.reserved_gb:g} GB) of {spec.hardware.gpu_memory_gb:g} GB -- "
        + ("fits on every GPU." if p.fits else
           "does not fit: " + ", ".join(f"GPU {g.index} ({fmt_bytes(g.memory_bytes)})"
                                        for g in gpus if not g.fits) + " overflow.")))
    by = {b.name: b for b in p.baselines}
    single, m1 = by["single_gpu"], by["pipeline_m1_no_overlap"]
    cuts = {b.name: 1 - pred.latency_s / b.latency_s for b in (single, m1)}
    out.append(_vs_baselines(
        "latency cut 40%", cuts, SEED_CLAIMS["latency_cut"],
        f"Claim '40% latency reduction': predicted latency {_ms(pred.latency_s)} on {dev} vs "
        f"{_ms(single.latency_s)} single GPU{'' if single.fits else ' (which does not fit)'} "
        f"({fmt_signed_pct(-cuts['single_gpu'])}) and {_ms(m1.latency_s)} pipeline m=1 without overlap "
        f"({fmt_signed_pct(-cuts['pipeline_m1_no_overlap'])})"))
    gains = {b.name: pred.throughput_tokens_per_s / b.throughput_tokens_per_s - 1 for b in (single, m1)}
    out.append(_vs_baselines(
        "throughput +60%", gains, SEED_CLAIMS["throughput_gain"],
        f"Claim '+60% throughput': predicted steady-state {pred.throughput_tokens_per_s:,.0f} tokens/s vs "
        f"{single.throughput_tokens_per_s:,.0f} single GPU ({fmt_signed_pct(gains['single_gpu'])}) and "
        f"{m1.throughput_tokens_per_s:,.0f} pipeline m=1 without overlap "
        f"({fmt_signed_pct(gains['pipeline_m1_no_overlap'])})"))
    holds = pred.steady_state_utilization >= SEED_CLAIMS["utilization"]
    out.append(Verdict(
        "95% GPU utilisation",
        f"{_pct(pred.utilization)} over one batch, {_pct(pred.steady_state_utilization)} steady state",
        holds,
        f"Claim '95% GPU utilisation': predicted busy fraction {_pct(pred.utilization)} over one batch "
        f"(bubble {_pct(pred.bubble_fraction)}) and {_pct(pred.steady_state_utilization)} in steady state "
        f"(mean busy / bottleneck period); MFU {_pct(pred.mfu)} of peak -- {_state(holds)}."))
    m1_bubble = _bubble_of(spec.replace(schedule={"micro_batches": 1}), p.device)
    cut = 1 - pred.bubble_fraction / m1_bubble if m1_bubble > 0 else 0.0
    holds = cut >= SEED_CLAIMS["bubble_cut"]
    out.append(Verdict(
        "25% bubble time reduction",
        f"bubble {_pct(pred.bubble_fraction)} vs {_pct(m1_bubble)} at m=1",
        holds,
        f"Claim '25% bubble time reduction' (from m={spec.schedule.micro_batches} micro-batches): bubble "
        f"{_pct(pred.bubble_fraction)} vs {_pct(m1_bubble)} with m=1 (same overlap), a {_pct(cut)} "
        f"relative cut -- {_state(holds)}."))
    return out


def _bubble_of(spec: DeploymentSpec, device: DeviceProfile) -> float:
    return predict(spec, device)[0].bubble_fraction


def _vs_baselines(claim: str, got: dict[str, float], target: float, text: str) -> Verdict:
    ok = {k: v >= target for k, v in got.items()}
    holds: bool | None = True if all(ok.values()) else (False if not any(ok.values()) else None)
    extra = ""
    if holds is None:
        extra = f" (only against {', '.join(k for k, v in ok.items() if v)})"
    figure = ", ".join(f"{fmt_signed_pct(v)} vs {k}" for k, v in got.items())
    return Verdict(claim, figure, holds, f"{text} -- {_state(holds)}{extra}.")
