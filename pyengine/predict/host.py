"""Host time of a decode step, per rank: what the CPU spends issuing the step, beside what the GPU
spends running it.

On a GPU every kernel costs a few microseconds of host time to launch whatever its size, and every
schedule action some of the runtime's own Python. At decode the work per launch is small, so the
host can bound the step. Per rank, from its action table for the step (the same tables the
simulator replays):

    eager     actions x action_host_us + kernels x host_launch_us
    graphed   comm actions x action_host_us + compute actions x (action_host_us + graph_replay_us)
    device    the rank's busy time in the simulated step (compute and communication)

where `kernels` are the launches of each compute on the Triton path (the GPU's default), per layer
part and decode group: counted by CI on that path (tests/execute/test_launch_budget.py pins these
numbers to the counts). The rank is host-bound when its host time exceeds its device time; the
step's time is then its host time, not the device's.
"""

from __future__ import annotations

from dataclasses import dataclass

from pyengine.core.spec import DeploymentSpec
from pyengine.model.batch import Batch
from pyengine.model.stages import StageKind
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.prediction import predict
from pyengine.schedule import Kind, build


@dataclass(frozen=True, slots=True)
class RankHost:
    actions: int
    computes: int
    kernels: int
    eager_s: float
    graphed_s: float
    device_s: float

    def bound(self, graphed: bool) -> str:
        host = self.graphed_s if graphed else self.eager_s
        return "host-bound" if host > self.device_s else "device-bound"


@dataclass(frozen=True, slots=True)
class StepHost:
    ranks: dict[int, RankHost]
    device_step_s: float
    """The simulated step (device time only)."""

    def step_s(self, graphed: bool) -> float:
        """The step's time: the simulated one, or the slowest rank's host time when longer."""
        host = max((r.graphed_s if graphed else r.eager_s) for r in self.ranks.values())
        return max(self.device_step_s, host)


LAUNCHES = {
    (StageKind.EMBED, "first"): 13,  # embedding, norm, QKV GEMM, norm+RoPE+KV write, 2 attention,
    (StageKind.EMBED, "later"): 12,  # O GEMM, residual+norm, router GEMM, top-k, padding mask (2)
    (StageKind.EXPERTS, "tensor"): 4,  # align, column GEMM + SwiGLU, row GEMM, k-row sum
    (StageKind.EXPERTS, "expert"): 6,  # the same, after making the received ids and weights dense
    (StageKind.OUTPUT, "last"): 2,  # residual + norm, head GEMM
}
"""Launches of one compute action of a decode step on the Triton path, by stage part."""
MLA_LAUNCHES = {"first": 20, "later": 19}
"""The attention rank's launches with multi-head latent attention: the q and latent projections
(GEMMs; q's low-rank path with its norm), one kernel for q's RoPE + the latent norm + the shared
key's RoPE + the cache write, the absorption of q and of the output (einsums), the latent read in
one kernel + combine, o, the norms and the router."""
MLP_LAUNCHES = 6
"""A shared expert's or a dense layer's SwiGLU beside other work: two GEMMs, silu, product, GEMM, add
(on the attention rank into x; on an expert rank, its shard, into the routed experts' partial)."""
GATE_LAUNCHES = 3
"""A gated shared expert's weight (Qwen2-MoE): its GEMV, sigmoid, product (wherever it runs)."""
ROUTER_LAUNCHES = 5
"""What a dense layer does not launch: the router GEMM, its top-k, the padding mask, the payload."""
EMPTY_ROUTING_LAUNCHES = 2
"""A dense layer whose MLP runs on the expert GPUs: the empty routing it sends (ids -1, weights 0)."""


def launches(spec: DeploymentSpec, a) -> int:
    """The Triton path's launches of compute action `a` of a decode step."""
    kind, m = StageKind(a.stage), spec.model
    here = not spec.mlps_on_experts  # the shared expert and dense MLPs on the attention rank
    shared = (MLP_LAUNCHES + (GATE_LAUNCHES if m.shared_expert_gate else 0)) if m.shared_expert_size else 0
    if kind is StageKind.EMBED:
        part = "first" if not a.layer else "later"
        base = MLA_LAUNCHES[part] if m.mla is not None else LAUNCHES[(kind, part)]
        if m.is_dense(a.layer):
            return base - ROUTER_LAUNCHES + (MLP_LAUNCHES if here else EMPTY_ROUTING_LAUNCHES)
        return base + (shared if here else 0)
    if kind is StageKind.EXPERTS:
        mode = "expert" if spec.expert_parallel else "tensor"
        if m.is_dense(a.layer):  # its MLP shard alone: no add (it is the partial); EP copies the token ids out
            return MLP_LAUNCHES - 1 + (1 if spec.expert_parallel else 0)
        return LAUNCHES[(kind, mode)] + (0 if here else shared)
    return LAUNCHES[(kind, "last")]


def kernels_of(spec: DeploymentSpec, actions) -> int:
    return sum(launches(spec, a) for a in actions if a.kind is Kind.COMPUTE)


def decode_host(spec: DeploymentSpec, device: DeviceProfile, position: int) -> StepHost:
    """Host and device time per rank of one decode step of every sequence at `position`."""
    batch = Batch.decode([position] * spec.model.batch_size, spec.schedule.micro_batches)
    table = build(spec, batch=batch)
    pred, tl = predict(spec, device, table=table, batch=batch)
    ranks = {}
    for rank, actions in table.items():
        computes = sum(1 for a in actions if a.kind is Kind.COMPUTE)
        kernels = kernels_of(spec, actions)
        act, launch, replay = device.action_host_us, device.host_launch_us, device.graph_replay_us
        eager = (len(actions) * act + kernels * launch) * 1e-6
        graphed = ((len(actions) - computes) * act + computes * (act + replay)) * 1e-6
        device_s = tl.compute_s(rank) + tl.exposed_comm_s(rank)  # compute and comm lanes, unioned
        ranks[rank] = RankHost(len(actions), computes, kernels, eager, graphed, device_s)
    return StepHost(ranks, pred.latency_s)
