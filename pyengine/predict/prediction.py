"""Latency, throughput, bubble and utilisation of a deployment from one simulated batch, and the
seed's implied baselines predicted the same way.

latency     makespan of one batch (the simulator over the schedule tables).
throughput  tokens per second for a continuous stream of batches, assuming consecutive batches
            overlap perfectly: steady-state period = the bottleneck rank's per-batch lane time
            (compute; comm on its own lane; compute + comm when comm.overlap is False). An
            upper bound a real runtime approaches.
bubble      1 - mean busy fraction over the ranks, over one batch's timeline.
utilisation busy fraction of the GPUs, over one batch (= 1 - bubble) and in steady state
            (mean busy / period). Busy time includes memory-bound kernels, so it is not the
            fraction of peak FLOP/s (`mfu` reports that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pyengine.core.spec import DeploymentSpec
from pyengine.core.timeline import Timeline
from pyengine.model.batch import Batch
from pyengine.model.forward import single_device_spec
from pyengine.model.routing import Routing
from pyengine.model.stages import stages_of
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.resources import memory_bytes
from pyengine.predict.roofline import compute_kernels, op_costs
from pyengine.predict.simulate import simulate
from pyengine.schedule import Action, Kind, Table, build


@dataclass(slots=True)
class Predicted:
    latency_s: float
    throughput_tokens_per_s: float
    period_s: float
    bubble_fraction: float
    utilization: float
    steady_state_utilization: float
    mfu: float
    """Model FLOPs per second in steady state / (peak x number of GPUs)."""
    exposed_comm_s: float
    hidden_comm_fraction: float


@dataclass(slots=True)
class Baseline:
    name: str
    description: str
    latency_s: float
    throughput_tokens_per_s: float
    fits: bool
    memory_bytes: int
    note: str = ""


def predict(spec: DeploymentSpec, device: DeviceProfile, table: Table | None = None,
            cost: Callable[[Action], float] | None = None,
            routing: Routing | None = None, batch: Batch | None = None) -> tuple[Predicted, Timeline]:
    """Figures from one simulated batch (default: the spec's own; a decode step passes its
    Batch). `cost` overrides the roofline op costs (e.g. with op times measured on a real GPU);
    `routing` is what expert-parallel costs assume."""
    table = table if table is not None else build(spec, batch=batch)
    cost = cost or op_costs(spec, device, routing, batch)
    tokens = batch.tokens if batch is not None else spec.model.tokens
    tl = simulate(spec, table, cost)
    lane = {}
    for r, actions in table.items():
        comp = sum(cost(a) for a in actions if a.kind is Kind.COMPUTE)
        comm = sum(cost(a) for a in actions if a.kind is not Kind.COMPUTE)
        lane[r] = max(comp, comm) if spec.comm.overlap else comp + comm
    period = max(lane.values())
    busy = {r: sum(cost(a) for a in acts if a.kind is Kind.COMPUTE) for r, acts in table.items()}
    total_flops = sum(cost_flops(spec, table, routing, batch))
    peak = device.peak_flops_per_s(spec.model.dtype)
    pred = Predicted(
        latency_s=tl.makespan_s,
        throughput_tokens_per_s=tokens / period,
        period_s=period,
        bubble_fraction=tl.bubble_fraction,
        utilization=tl.utilization,
        steady_state_utilization=sum(busy.values()) / len(busy) / period,
        mfu=total_flops / period / (peak * len(busy)),
        exposed_comm_s=tl.exposed_comm_total_s,
        hidden_comm_fraction=tl.hidden_comm_fraction,
    )
    return pred, tl


def cost_flops(spec: DeploymentSpec, table: Table, routing: Routing | None, batch: Batch | None) -> list[float]:
    """FLOPs of every compute in `table`, priced for its chunk of `batch`."""
    return [k.flops for acts in table.values() for a in acts if a.kind is Kind.COMPUTE
            for k in compute_kernels(spec, a, routing, batch)]


def compute_actions(spec: DeploymentSpec) -> list[Action]:
    """Every COMPUTE action of one batch (what the schedule tables contain, without building them)."""
    return [Action(r, Kind.COMPUTE, st.kind, mb, layer=layer) for st in stages_of(spec)
            for layer in st.layers() for r in st.ranks for mb in range(spec.schedule.micro_batches)]


def predict_busy(spec: DeploymentSpec, device: DeviceProfile, by_stage: bool = False,
                 routing: Routing | None = None) -> dict:
    """Predicted compute seconds per batch: {rank: s}, or {(rank, stage): s} with by_stage."""
    cost = op_costs(spec, device, routing)
    out: dict = {}
    for a in compute_actions(spec):
        key = (a.rank, a.stage) if by_stage else a.rank
        out[key] = out.get(key, 0.0) + cost(a)
    return out


def single_gpu_spec(spec: DeploymentSpec) -> DeploymentSpec:
    """Everything on GPU 0, one micro-batch, no communication (the single-device baseline's spec)."""
    return single_device_spec(spec)


def baselines(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None = None) -> list[Baseline]:
    """The seed's implied baselines, predicted with the same model."""
    cap = spec.hardware.gpu_memory_gb * 1e9
    single = single_gpu_spec(spec)
    pred, _ = predict(single, device)
    mem = memory_bytes(single, device)[0]
    fits = mem <= cap
    out = [Baseline(
        "single_gpu", "whole model on one GPU, sequential, m=1, no comm",
        pred.latency_s, pred.throughput_tokens_per_s, fits, mem,
        "" if fits else f"does not fit: needs {mem / 1e9:.1f} GB of {spec.hardware.gpu_memory_gb:g} GB; "
                        "figures are what it would take if it did")]
    m1 = spec.replace(schedule={"micro_batches": 1}, comm={"overlap": False})
    pred, _ = predict(m1, device, routing=routing)
    mems = memory_bytes(m1, device, routing)
    out.append(Baseline(
        "pipeline_m1_no_overlap", "this stage map, m=1, comm serialised with compute",
        pred.latency_s, pred.throughput_tokens_per_s, all(v <= cap for v in mems.values()),
        max(mems.values())))
    return out
