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
from pyengine.model.batch import Batch
from pyengine.model.payloads import COUNT
from pyengine.model.routing import Routing
from pyengine.model.stages import KernelCost, StageKind, stages_of
from pyengine.predict.devices import DeviceProfile, load_profile
from pyengine.schedule import Action, Kind

OpCost = Callable[[Action], float]


def compute_kernels(spec: DeploymentSpec, a: Action, routing: Routing | None = None,
                    batch: Batch | None = None) -> list[KernelCost]:
    """The kernels one COMPUTE action launches, with their FLOPs and HBM bytes, for its chunk of
    `batch` (default: the spec's own)."""
    if a.kind is not Kind.COMPUTE:
        raise ValueError(f"action {a.id}: only a COMPUTE launches kernels")
    chunk = (batch or Batch.of_spec(spec)).chunks[a.micro_batch]
    return stages_of(spec, routing)[a.stage].kernels(chunk.tokens, a.rank, a.layer, chunk)


def message_bytes(spec: DeploymentSpec, a: Action, routing: Routing | None = None,
                  batch: Batch | None = None) -> float:
    """Bytes one SEND/RECV moves, or the buffer size one REDUCE reduces (per member). A sized
    payload (expert parallel) moves its expected rows under `routing`, plus its count."""
    if a.kind is Kind.COMPUTE:
        raise ValueError(f"action {a.id}: a COMPUTE moves no message")
    t = (batch or Batch.of_spec(spec)).chunks[a.micro_batch].tokens
    if a.kind is Kind.REDUCE:
        return a.payload.reduced_bytes(spec, t)
    if not a.payload.sized:
        return a.payload.nbytes(spec, t)
    return COUNT.nbytes + sized_rows(spec, a, routing, t) * a.payload.nbytes(spec, 1)


def sized_rows(spec: DeploymentSpec, a: Action, routing: Routing | None = None,
               tokens: int | None = None) -> float:
    """Expected rows of a sized message: those of the expert GPU at its receiving (dispatch) or
    sending (combine) end, for a micro-batch of `tokens` (default: the spec's)."""
    sender, receiver = (a.rank, a.peers[0]) if a.kind is Kind.SEND else (a.peers[0], a.rank)
    expert_rank = receiver if a.payload.sized_by_receiver else sender
    t = spec.micro_batch_sizes()[a.micro_batch] if tokens is None else tokens
    return stages_of(spec, routing)[StageKind.EXPERTS].rows_for(expert_rank, t)


def op_costs(spec: DeploymentSpec, device: DeviceProfile | str | None = None,
             routing: Routing | None = None, batch: Batch | None = None) -> OpCost:
    """Seconds per action from the roofline model of `device` (memoised per action shape), for
    `batch` (default: the spec's own). A sized message is two transfers: its count, then its rows."""
    dev = load_profile(device)
    batch = batch or Batch.of_spec(spec)
    dtype, link = spec.model.dtype, spec.hardware.interconnect
    memo: dict[tuple, float] = {}
    stages = stages_of(spec, routing)

    def cost(a: Action) -> float:  # messages do not depend on the layer; computes on its cost class
        layer = stages[a.stage].cost_layer(a.layer) if a.kind is Kind.COMPUTE else None
        key = (a.rank, a.kind, a.stage, a.micro_batch, a.payload, a.peers, layer)
        if key not in memo:
            if a.kind is Kind.COMPUTE:
                memo[key] = sum(dev.kernel_s(k, dtype) for k in compute_kernels(spec, a, routing, batch))
            elif a.kind is Kind.REDUCE:
                memo[key] = dev.collective_s(a.payload.collective, message_bytes(spec, a, batch=batch),
                                             len(a.peers), link)
            elif a.payload.sized:
                memo[key] = dev.transfer_s(COUNT.nbytes, link) + dev.transfer_s(
                    message_bytes(spec, a, routing, batch) - COUNT.nbytes, link)
            else:
                memo[key] = dev.transfer_s(message_bytes(spec, a, batch=batch), link)
        return memo[key]

    return cost
