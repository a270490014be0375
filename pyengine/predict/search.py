"""Plan search: enumerate valid alternatives to a deployment and rank them by predicted latency
and throughput, with the term (work, imbalance, comm, bubble) that makes the winner win."""

from __future__ import annotations

from dataclasses import dataclass

from pyengine.core.spec import DeploymentSpec, SpecError
from pyengine.core.timeline import Timeline
from pyengine.core.units import fmt_signed_pct
from pyengine.model.routing import Routing
from pyengine.predict.balance import balanced_fractions, latency_fractions, with_experts
from pyengine.predict.devices import DeviceProfile, load_profile
from pyengine.predict.ep_layouts import ranked_ep_specs
from pyengine.predict.prediction import predict
from pyengine.predict.resources import fits


MICRO_BATCHES = (1, 2, 3, 4, 6, 8, 16)
EP_KEEP = 3
"""Expert-count vectors per stage map fully evaluated (best by predicted bottleneck busy time)."""


class SearchResult(list):
    """The ranked candidates, plus how many layouts the search considered of each kind."""

    def __init__(self, cands: list, considered: dict[str, int]):
        super().__init__(cands)
        self.considered = considered


@dataclass(slots=True)
class Candidate:
    spec: DeploymentSpec
    label: str
    latency_s: float
    throughput_tokens_per_s: float
    bubble_fraction: float
    fits: bool
    terms: dict[str, float]
    """Latency decomposition: work (mean busy), imbalance (max - mean busy), comm (exposed
    comm on the busiest rank), bubble (its remaining idle time); they sum to latency_s."""
    why: str = ""
    rank_latency: int = 0
    rank_throughput: int = 0
    pareto: bool = False
    is_seed: bool = False

    def to_dict(self) -> dict:
        return {"label": self.label, "latency_s": self.latency_s,
                "throughput_tokens_per_s": self.throughput_tokens_per_s,
                "bubble_fraction": self.bubble_fraction, "fits": self.fits, "terms": self.terms,
                "why": self.why, "rank_latency": self.rank_latency,
                "rank_throughput": self.rank_throughput, "pareto": self.pareto,
                "is_seed": self.is_seed, "config": self.spec.to_dict()}


def latency_terms(tl: Timeline) -> dict[str, float]:
    busy = {r: tl.compute_s(r) for r in tl.ranks}
    mean = sum(busy.values()) / len(busy)
    b = max(busy, key=busy.get)
    exposed = tl.exposed_comm_s(b)
    return {"work": mean, "imbalance": busy[b] - mean, "comm": exposed,
            "bubble": tl.makespan_s - busy[b] - exposed}


def stage_maps(spec: DeploymentSpec) -> list[tuple[list[int], int]]:
    """(experts group, output GPU) pairs to try: the seed's V placement and its output
    moved to another GPU, with the experts on the non-embed GPUs or on every GPU."""
    n = spec.hardware.num_gpus
    emb = spec.stage("embed").gpus[0]
    others = [g for g in range(n) if g != emb]
    groups = [others] if others else []
    if n > 1:
        groups.append(list(range(n)))
    return [(grp, o) for grp in groups for o in sorted({emb, *others})]


def search(spec: DeploymentSpec, device: DeviceProfile | str | None = None,
           micro_batches: tuple[int, ...] = MICRO_BATCHES,
           boundaries: tuple[str, ...] = ("all_reduce", "reduce_scatter", "partials"),
           kinds: tuple[str, ...] = ("gpipe", "asready"), rank_by: str = "latency",
           routing: Routing | None = None, modes: tuple[str, ...] = ("tensor", "expert"),
           show_progress: bool = False, console=None) -> SearchResult:
    """Enumerate valid deployments, predict each, rank by latency (or throughput).

    Space: stage maps (stage_maps) x micro-batch counts x schedule kind x, for tensor
    parallelism, the F split (even, and the splits that balance busy time or minimise latency:
    uneven TP, possibly giving GPU 0 a slice of the expert FFN) x boundary pattern, and for
    expert parallelism the expert counts around the balanced optimum (pyengine.predict.ep_layouts).
    Every candidate is built through spec.replace, so the spec's validation applies.
    show_progress: a bar over the stage maps on a terminal's stderr (pyengine.core.progress)."""
    from pyengine.core.progress import progress

    maps = stage_maps(spec)
    with progress(len(maps), "plan search: stage maps", show_progress, console) as advance:
        cands, considered, seed_key = _search_maps(spec, maps, device, micro_batches, boundaries,
                                                   kinds, routing, modes, advance)
        dev = load_profile(device)
    if seed_key not in {c.spec.to_json() for c in cands}:  # the seed is always in the table
        cands.append(_evaluate(spec, dev, "seed config", True, routing))
    _rank(cands, rank_by)
    return SearchResult(cands, considered)


def _search_maps(spec, maps, device, micro_batches, boundaries, kinds, routing, modes, advance):
    """The candidates of every stage map, calling advance() after each map."""
    dev = load_profile(device)
    seen: set[str] = set()
    cands: list[Candidate] = []
    seed_key = spec.to_json()
    considered = {"tensor": 0, "expert_count_vectors": 0, "expert": 0}

    def add(c: DeploymentSpec, label: str, mode: str) -> None:
        key = c.to_json()
        if key not in seen:
            seen.add(key)
            considered[mode] += 1
            cands.append(_evaluate(c, dev, label, key == seed_key, routing))

    for grp, o in maps:
        advance(1)
        if "expert" in modes:
            _expert_candidates(spec, dev, grp, o, micro_batches, kinds, routing, add, considered)
        if "tensor" not in modes:
            continue
        for m in micro_batches:
            if m > spec.model.tokens:
                continue
            try:
                even = with_experts(spec, grp, None, o).replace(schedule={"micro_batches": m})
            except SpecError:  # e.g. F smaller than the group
                continue
            splits: list[tuple[str, dict[int, float] | None]] = [("even", None)]
            for tag, fr in (("busy-balanced", balanced_fractions(even, dev, grp)),
                            ("latency split", latency_fractions(even, dev, grp, o))):
                if fr is not None and max(abs(f - 1 / len(grp)) for f in fr.values()) > 0.005:
                    splits.append((tag, fr))
            for tag, fr in splits:
                try:
                    base = even if fr is None else with_experts(even, grp, fr, o)
                except SpecError:  # rounding left a shard without a column of F
                    continue
                f_txt = "even" if fr is None else "/".join(f"{v:.2f}" for v in fr.values()) + f" ({tag})"
                label = f"experts[{','.join(map(str, grp))}] F {f_txt} out{o} m={m}"
                for boundary in boundaries:
                    for kind in kinds:
                        add(base.replace(schedule={"kind": kind}, comm={"boundary": boundary}),
                            f"{label} {boundary} {kind}", "tensor")
    return cands, considered, seed_key


def _expert_candidates(spec, dev, grp, o, micro_batches, kinds, routing, add, considered) -> None:
    """EP layouts on `grp` with the output on `o`: the EP_KEEP count vectors with the lowest
    predicted bottleneck busy time, each at every micro-batch count and schedule kind."""
    ranked = ranked_ep_specs(spec, dev, grp, o, routing)
    considered["expert_count_vectors"] += len(ranked)
    for counts, c in ranked[:EP_KEEP]:
        label = f"EP experts[{','.join(map(str, grp))}] counts {'/'.join(map(str, counts))} out{o}"
        for m in micro_batches:
            if m > spec.model.tokens:
                continue
            for kind in kinds:
                add(c.replace(schedule={"micro_batches": m, "kind": kind}), f"{label} m={m} {kind}", "expert")


def _evaluate(spec: DeploymentSpec, dev: DeviceProfile, label: str, is_seed: bool,
              routing: Routing | None = None) -> Candidate:
    pred, tl = predict(spec, dev, routing=routing)
    return Candidate(spec=spec, label=label, latency_s=pred.latency_s,
                     throughput_tokens_per_s=pred.throughput_tokens_per_s,
                     bubble_fraction=pred.bubble_fraction, fits=fits(spec, dev, routing),
                     terms=latency_terms(tl), is_seed=is_seed)


def _rank(cands: list[Candidate], rank_by: str) -> None:
    if rank_by not in ("latency", "throughput"):
        raise ValueError(f"rank_by = {rank_by!r}: must be 'latency' or 'throughput'")
    by_lat = sorted(cands, key=lambda c: (not c.fits, c.latency_s, -c.throughput_tokens_per_s))
    by_thr = sorted(cands, key=lambda c: (not c.fits, -c.throughput_tokens_per_s, c.latency_s))
    for i, c in enumerate(by_lat):
        c.rank_latency = i + 1
    for i, c in enumerate(by_thr):
        c.rank_throughput = i + 1
    fitting = [c for c in cands if c.fits]
    for c in fitting:
        c.pareto = not any(o.latency_s <= c.latency_s and o.throughput_tokens_per_s >= c.throughput_tokens_per_s
                           and (o.latency_s < c.latency_s or o.throughput_tokens_per_s > c.throughput_tokens_per_s)
                           for o in fitting)
    seed = next(c for c in cands if c.is_seed)
    for c in cands:
        c.why = explain(c, seed)
    cands.sort(key=lambda c: c.rank_latency if rank_by == "latency" else c.rank_throughput)


_TERM_WORDS = {"work": "work (op time, e.g. weight re-reads per micro-batch)", "imbalance": "imbalance",
               "comm": "exposed comm", "bubble": "bubble"}


def explain(c: Candidate, seed: Candidate) -> str:
    """Which latency terms shrink (or grow) relative to the seed, largest first."""
    if c.is_seed:
        return "your config (reference)"
    if not c.fits:
        return "does not fit in GPU memory"
    delta = {k: c.terms[k] - seed.terms[k] for k in c.terms}
    d_lat = c.latency_s - seed.latency_s
    d_thr = c.throughput_tokens_per_s / seed.throughput_tokens_per_s - 1
    shrunk = sorted((k for k in delta if delta[k] < -1e-9), key=lambda k: delta[k])
    grown = sorted((k for k in delta if delta[k] > 1e-9), key=lambda k: -delta[k])
    head = (f"latency {fmt_signed_pct(d_lat / seed.latency_s)}, throughput {fmt_signed_pct(d_thr)} vs your config")
    parts_ = []
    if shrunk:
        parts_.append("shrinks " + ", ".join(f"{_TERM_WORDS[k] if i == 0 else k} {delta[k] * 1e3:+.2f} ms"
                                            for i, k in enumerate(shrunk)))
    if grown:
        parts_.append("grows " + ", ".join(f"{k} {delta[k] * 1e3:+.2f} ms" for k in grown))
    return head + ": " + "; ".join(parts_) if parts_ else head
