"""Seconds per action from a device profile's roofline: the op model the planner and simulator use.

  COMPUTE   each kernel the stage launches (pyengine.model.stages), priced by the device
            (DeviceProfile.kernel_s: max(FLOPs / achievable peak for its kind and rows, HBM
            bytes / achievable bandwidth) plus the launch cost), summed. In the expert stage
            every expert a micro-batch touches streams its weights from HBM once per
            micro-batch (the expected number touched, pyengine.model.routing), which is why
            more micro-batches cost more weight traffic.
  SEND/RECV latency + the payload's bytes / achievable link bandwidth.
  REDUCE    the payload's collective on a ring (pyengine.core.collectives): fixed and per-step
            latency + bus bytes / achievable link bandwidth.
"""

from __future__ import annotations

from collections.abc import Callable

from pyengine.core.spec import DeploymentSpec
from pyengine.model.payloads import COUNT
from pyengine.model.routing import Routing
from pyengine.model.stages import KernelCost, StageKind, stages_of
from pyengine.predict.devices import DeviceProfile, load_profile
from pyengine.schedule import Action, Kind

OpCost = Callable[[Action], float]


def compute_kernels(spec: DeploymentSpec, a: Action, routing: Routing | None = None) -> list[KernelCost]:
    """The kernels one COMPUTE action launches, with their FLOPs and HBM bytes."""
    if a.kind is not Kind.COMPUTE:
        raise ValueError(f"action {a.id}: only a COMPUTE launches kernels")
    return stages_of(spec, routing)[a.stage].kernels(spec.micro_batch_sizes()[a.micro_batch], a.rank)


def message_bytes(spec: DeploymentSpec, a: Action, routing: Routing | None = None) -> float:
    """Bytes one SEND/RECV moves, or the buffer size one REDUCE reduces (per member). A sized
    payload (expert parallel) moves its expected rows under `routing`, plus its count."""
    if a.kind is Kind.COMPUTE:
        raise ValueError(f"action {a.id}: a COMPUTE moves no message")
    t = spec.micro_batch_sizes()[a.micro_batch]
    if a.kind is Kind.REDUCE:
        return a.payload.reduced_bytes(spec, t)
    if not a.payload.sized:
        return a.payload.nbytes(spec, t)
    return COUNT.nbytes + sized_rows(spec, a, routing) * a.payload.nbytes(spec, 1)


def sized_rows(spec: DeploymentSpec, a: Action, routing: Routing | None = None) -> float:
    """Expected rows of a sized message: those of the expert GPU at its receiving (dispatch) or
    sending (combine) end."""
    sender, receiver = (a.rank, a.peers[0]) if a.kind is Kind.SEND else (a.peers[0], a.rank)
    expert_rank = receiver if a.payload.sized_by_receiver else sender
    t = spec.micro_batch_sizes()[a.micro_batch]
    return stages_of(spec, routing)[StageKind.EXPERTS].rows_for(expert_rank, t)


def op_costs(spec: DeploymentSpec, device: DeviceProfile | str | None = None,
             routing: Routing | None = None) -> OpCost:
    """Seconds per action from the roofline model of `device` (memoised per action shape).
    A sized message is two transfers: its count, then its rows."""
    dev = load_profile(device)
    dtype, link = spec.model.dtype, spec.hardware.interconnect
    memo: dict[tuple, float] = {}

    def cost(a: Action) -> float:
        key = (a.rank, a.kind, a.stage, a.micro_batch, a.payload, a.peers)
        if key not in memo:
            if a.kind is Kind.COMPUTE:
                memo[key] = sum(dev.kernel_s(k, dtype) for k in compute_kernels(spec, a, routing))
            elif a.kind is Kind.REDUCE:
                memo[key] = dev.collective_s(a.payload.collective, message_bytes(spec, a), len(a.peers), link)
            elif a.payload.sized:
                memo[key] = dev.transfer_s(COUNT.nbytes, link) + dev.transfer_s(
                    message_bytes(spec, a, routing) - COUNT.nbytes, link)
            else:
                memo[key] = dev.transfer_s(message_bytes(spec, a), link)
        return memo[key]

    return cost
