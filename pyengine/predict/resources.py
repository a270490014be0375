"""Per-GPU resources of a deployment: model parts, weights, activations, memory, traffic.

activation  peak live activation bytes on a GPU: the working set of the largest micro-batch
            for every stage the GPU runs, plus, for the other m-1 micro-batches, the buffers
            that wait across micro-batches under GPipe (received inputs, partial outputs
            awaiting their reduction, the residual x kept for stage 2, the logits of
            finished micro-batches). Forward only.
kv cache    every layer's keys and values of the batch's sequences, on the attention GPU.
memory      weights + activations + KV cache + the profile's reserved_gb (context, NCCL, slack),
            against hardware.gpu_memory_gb (1 GB = 1e9 bytes).
traffic     bytes per batch by peer; a ring collective counts bus factor x buffer bytes to
            the ring successor and from its predecessor.
"""

from __future__ import annotations

from pyengine.core.spec import DeploymentSpec
from pyengine.model.routing import Routing
from pyengine.model.stages import stages_on
from pyengine.predict.devices import DeviceProfile
from pyengine.predict.roofline import message_bytes
from pyengine.schedule import Kind, Table


def parts(spec: DeploymentSpec) -> dict[int, list[str]]:
    """Module division: the model parts each GPU holds."""
    return {r: [st.part(r) for st in stages_on(spec, r)] for r in spec.ranks}


def weight_bytes(spec: DeploymentSpec) -> dict[int, dict[str, int]]:
    """Weights resident on each GPU, by tensor (expert tensors: only the GPU's slice)."""
    out: dict[int, dict[str, int]] = {}
    for r in spec.ranks:
        out[r] = {}
        for st in stages_on(spec, r):
            out[r].update(st.weight_bytes(r))
    return out


def activation_bytes(spec: DeploymentSpec, routing: Routing | None = None) -> dict[int, int]:
    t = max(spec.micro_batch_sizes())
    waiting = spec.schedule.micro_batches - 1
    out = {}
    for r in spec.ranks:
        total = 0
        for st in stages_on(spec, r, routing):
            work, held = st.working_set(t, r)
            total += work + waiting * held
        out[r] = total
    return out


def state_bytes(spec: DeploymentSpec, capacity: int | None = None,
                sequences: int | None = None) -> dict[int, int]:
    """State kept across micro-batches and forwards per GPU: the KV cache of `sequences`
    sequences (default batch_size) of up to `capacity` tokens (default seq_len; generation:
    prompt + new tokens)."""
    m = spec.model
    seqs = m.batch_size if sequences is None else sequences
    cap = m.seq_len if capacity is None else capacity
    return {r: sum(st.state_bytes(r, seqs, cap) for st in stages_on(spec, r)) for r in spec.ranks}


def memory_bytes(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None = None,
                 capacity: int | None = None, sequences: int | None = None) -> dict[int, int]:
    """Weights + activations + the KV cache + reserved bytes per GPU (the cache sized as
    state_bytes says)."""
    w = weight_bytes(spec)
    act = activation_bytes(spec, routing)
    kv = state_bytes(spec, capacity, sequences)
    return {r: sum(w[r].values()) + act[r] + kv[r] + int(device.reserved_gb * 1e9) for r in spec.ranks}


def fits(spec: DeploymentSpec, device: DeviceProfile, routing: Routing | None = None) -> bool:
    cap = spec.hardware.gpu_memory_gb * 1e9
    return all(v <= cap for v in memory_bytes(spec, device, routing).values())


def traffic(spec: DeploymentSpec, table: Table, routing: Routing | None = None
            ) -> tuple[dict[int, dict[int, float]], dict[int, dict[int, float]]]:
    """Bytes per batch: sent[rank][peer], recv[rank][peer]."""
    sent: dict[int, dict[int, float]] = {r: {} for r in table}
    recv: dict[int, dict[int, float]] = {r: {} for r in table}

    def add(book: dict[int, float], peer: int, nbytes: float) -> None:
        book[peer] = book.get(peer, 0) + nbytes

    for r, actions in table.items():
        for a in actions:
            if a.kind is Kind.SEND:
                add(sent[r], a.peers[0], message_bytes(spec, a, routing))
            elif a.kind is Kind.RECV:
                add(recv[r], a.peers[0], message_bytes(spec, a, routing))
            elif a.kind is Kind.REDUCE and len(a.peers) > 1:
                n, i = len(a.peers), a.peers.index(r)
                moved = a.payload.collective.bus_factor(n) * message_bytes(spec, a)
                add(sent[r], a.peers[(i + 1) % n], moved)
                add(recv[r], a.peers[(i - 1) % n], moved)
    return sent, recv
