"""Event-driven replay of schedule tables -> Timeline.

Each rank has a compute lane and a comm lane (one shared lane when comm.overlap is
False). Actions on a lane run in table order; an action starts when its lane is free and
the actions it depends on (same-rank ids) have finished. A SEND and its RECV rendezvous:
both lanes must have reached them, they start together and last the same time. A REDUCE
starts when every member of its group has reached it.

Op costs come from the roofline model below (`default_op_costs`) or from the caller: a
mapping from action id (or (rank, id)) to seconds, or a callable(Action) -> seconds, so
the runtime can replay a table with measured op times.

The roofline model per action (T = the micro-batch's tokens, es = dtype bytes):
  stage 0  embed gather, rmsnorm, router GEMM (2*T*H*E FLOPs), softmax/top-k: each kernel
           max(FLOPs / achievable peak, bytes / achievable HBM), summed.
  stage 1  grouped gate+up GEMM with fused SwiGLU (4*T*k*H*F_r) and grouped down GEMM
           (2*T*k*F_r*H); every expert a micro-batch touches streams its weights from HBM
           once per micro-batch (min(E, T*k) experts assumed touched), which is why more
           micro-batches cost more weight traffic.
  stage 2  fused residual + partial sums + rmsnorm, then the output-head GEMM (2*T*H*V).
  SEND/RECV  latency + bytes / achievable link bandwidth.
  REDUCE   ring all-reduce (2(n-1)/n * bytes) or reduce-scatter ((n-1)/n * bytes).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from pyengine import costs
from pyengine.devices import DeviceProfile, load_profile
from pyengine.schedule import Action, Kind, ScheduleError, Table, build, check
from pyengine.spec import DeploymentSpec
from pyengine.timeline import COMM_LANE, COMPUTE_LANE, Span, Timeline

OpCosts = Mapping[str, float] | Mapping[tuple[int, str], float] | Callable[[Action], float]


# ---- the roofline op model ---------------------------------------------------------------
def compute_kernels(spec: DeploymentSpec, a: Action) -> list[tuple[str, float, float]]:
    """(kernel name, FLOPs, HBM bytes) of the kernels one COMPUTE action launches."""
    m, es = spec.model, costs.elem_bytes(spec)
    t = spec.micro_batch_sizes()[a.micro_batch]
    h, e, k, v = m.hidden_size, m.num_experts, m.top_k, m.vocab_size
    if a.stage == 0:
        return [
            ("embed_gather", 0.0, t * 8 + 2 * t * h * es),
            ("rmsnorm_in", 0.0, 2 * t * h * es + h * es),
            ("router_gemm", costs.stage0_flops(spec, t), t * h * es + h * e * es + t * e * 4),
            ("softmax_topk", 0.0, t * e * 4 + t * k * 8),
        ]
    if a.stage == 1:
        f = costs.shard_cols(spec)[a.rank]
        hit = min(e, t * k)
        pairs = t * k
        return [
            ("gate_up_swiglu", 4.0 * pairs * h * f, 2 * hit * h * f * es + pairs * h * es + pairs * f * es),
            ("down_combine", 2.0 * pairs * f * h, hit * f * h * es + pairs * f * es + pairs * h * es + t * h * es),
        ]
    if a.stage == 2:
        n_in = len(spec.stage("experts").gpus) if spec.comm.boundary == "partials" else 1
        return [
            ("residual_sum_rmsnorm", 0.0, (2 + n_in) * t * h * es + h * es),
            ("out_head_gemm", costs.stage2_flops(spec, t), h * v * es + t * h * es + t * v * es),
        ]
    raise ValueError(f"action {a.id}: stage {a.stage} is not a model stage")


def message_bytes(spec: DeploymentSpec, a: Action) -> int:
    """Bytes one SEND/RECV moves, or the buffer size one REDUCE reduces (per member)."""
    if a.kind is Kind.COMPUTE:
        raise ValueError(f"action {a.id}: a COMPUTE moves no message")
    t = spec.micro_batch_sizes()[a.micro_batch]
    grp = spec.stage("experts").gpus
    if a.kind is Kind.REDUCE:
        return costs.payload_bytes(spec, "sum", t)
    src = a.rank if a.kind is Kind.SEND else a.peers[0]
    part = grp.index(src) if a.payload == "half" else 0
    return costs.payload_bytes(spec, a.payload, t, part)


def default_op_costs(spec: DeploymentSpec, device: DeviceProfile | str | None = None) -> Callable[[Action], float]:
    """Seconds per action from the roofline model of `device`."""
    dev = load_profile(device)
    dtype, link = spec.model.dtype, spec.hardware.interconnect
    memo: dict[tuple, float] = {}

    def cost(a: Action) -> float:
        key = (a.rank, a.kind, a.stage, a.micro_batch, a.payload, a.peers)
        if key in memo:
            return memo[key]
        if a.kind is Kind.COMPUTE:
            s = sum(dev.compute_s(fl, by, dtype) for _, fl, by in compute_kernels(spec, a))
        elif a.kind is Kind.REDUCE:
            n, nbytes = len(a.peers), message_bytes(spec, a)
            s = (dev.all_reduce_s(nbytes, n, link) if a.payload == "sum"
                 else dev.reduce_scatter_s(nbytes, n, link))
        else:
            s = dev.transfer_s(message_bytes(spec, a), link)
        memo[key] = s
        return s

    return cost


def _cost_fn(op_costs: OpCosts) -> Callable[[Action], float]:
    if callable(op_costs):
        return op_costs

    def lookup(a: Action) -> float:
        for key in ((a.rank, a.id), a.id):
            if key in op_costs:
                return float(op_costs[key])
        raise ValueError(f"op_costs has no entry for rank {a.rank} action {a.id!r} "
                         "(key by action id or (rank, action id))")

    return lookup


# ---- replay ---------------------------------------------------------------------------------
def simulate(spec: DeploymentSpec | None, table: Table | None = None, op_costs: OpCosts | None = None,
             device: DeviceProfile | str | None = None, *, overlap: bool | None = None) -> Timeline:
    """Replay `table` (default: schedule.build(spec)) with `op_costs` (default: the roofline
    model of `device`) and return the timeline. `overlap` defaults to spec.comm.overlap
    (True without a spec). A table that cannot run raises ScheduleError."""
    if table is None:
        if spec is None:
            raise ValueError("simulate needs a spec or a table")
        table = build(spec)
    else:
        check(table)
    if op_costs is None:
        if spec is None:
            raise ValueError("simulate needs op_costs when no spec is given")
        cost = default_op_costs(spec, device)
    else:
        cost = _cost_fn(op_costs)
    if overlap is None:
        overlap = spec.comm.overlap if spec is not None else True

    def lane_of(a: Action) -> tuple[int, str]:
        if not overlap:
            return (a.rank, "shared")
        return (a.rank, COMPUTE_LANE if a.kind is Kind.COMPUTE else COMM_LANE)

    lanes: dict[tuple[int, str], list[Action]] = {}
    for rank in sorted(table):
        for a in table[rank]:
            lanes.setdefault(lane_of(a), []).append(a)
    pos = {key: 0 for key in lanes}
    free = {key: 0.0 for key in lanes}
    end: dict[tuple[int, str], float] = {}
    spans: list[Span] = []

    def head(key: tuple[int, str]) -> Action | None:
        acts = lanes.get(key)
        return acts[pos[key]] if acts is not None and pos[key] < len(acts) else None

    def deps_done(a: Action) -> bool:
        return all((a.rank, d) in end for d in a.deps)

    def ready_at(a: Action) -> float:
        return max([free[lane_of(a)]] + [end[(a.rank, d)] for d in a.deps])

    def run(group: list[Action], duration: float) -> None:
        start = max(ready_at(a) for a in group)
        for a in group:
            key = lane_of(a)
            free[key] = start + duration
            pos[key] += 1
            end[(a.rank, a.id)] = start + duration
            spans.append(Span(a.rank, COMPUTE_LANE if a.kind is Kind.COMPUTE else COMM_LANE,
                              a.id, a.kind.value, a.stage, a.micro_batch, start, start + duration))

    def partners(a: Action) -> list[Action] | None:
        """The group that must start together with `a`, if all are at their lane heads."""
        if a.kind is Kind.COMPUTE:
            return [a]
        if a.kind is Kind.REDUCE:
            group = []
            for p in a.peers:
                h = a if p == a.rank else head(lane_of(Action(p, Kind.REDUCE, 0, 0)))
                if h is None or h.kind is not Kind.REDUCE or h.id != a.id:
                    return None
                group.append(h)
            return group
        other = a.peers[0]
        want = Kind.RECV if a.kind is Kind.SEND else Kind.SEND
        h = head(lane_of(Action(other, want, 0, 0)))
        if (h is None or h.kind is not want or h.peers[0] != a.rank
                or (h.payload, h.micro_batch) != (a.payload, a.micro_batch)):
            return None
        return [a, h]

    remaining = sum(len(v) for v in lanes.values())
    while remaining:
        progressed = False
        for key in lanes:
            while (a := head(key)) is not None:
                group = partners(a)
                if group is None or not all(deps_done(g) for g in group):
                    break
                run(group, max(float(cost(g)) for g in group))
                remaining -= len(group)
                progressed = True
        if not progressed:
            heads = {f"{k[0]}/{k[1]}": head(k).id for k in lanes if head(k) is not None}
            raise ScheduleError(f"simulation cannot progress; lane heads: {heads}")
    makespan = max((s.end_s for s in spans), default=0.0)
    spans.sort(key=lambda s: (s.rank, s.lane, s.start_s))
    return Timeline(spans, makespan, tuple(sorted(table)))


# ---- hand-built tables for closed-form checks -------------------------------------------------
def linear_pipeline(stages: int, micro_batches: int) -> Table:
    """A plain p-stage chain, rank i = stage i, GPipe order: rank i receives micro-batch j
    from rank i-1, computes it and sends it on. Used to check the simulator against the
    closed forms (the seed's V placement puts GPU 0 in two stages, so it is not one)."""
    table: Table = {r: [] for r in range(stages)}
    for r in range(stages):
        for mb in range(micro_batches):
            deps: tuple[str, ...] = ()
            if r > 0:
                recv = Action(r, Kind.RECV, r, mb, "act", (r - 1,))
                table[r].append(recv)
                deps = (recv.id,)
            comp = Action(r, Kind.COMPUTE, r, mb, deps=deps)
            table[r].append(comp)
            if r < stages - 1:
                table[r].append(Action(r, Kind.SEND, r, mb, "act", (r + 1,), (comp.id,)))
    return table
