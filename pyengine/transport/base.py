"""The transport protocol shared by the nccl, gloo and local backends.

Every operation is issued without blocking and returns a :class:`Handle`.
Messages between one pair of ranks match in issue order (NCCL has no tags), and
collectives on a group match in issue order on every member. ``name`` labels
NVTX ranges and error messages; it does not affect matching.

GPU backends order work with events: an op first makes a comm stream wait on an
event recorded on the caller's *current* stream (so data produced before the call
is ready), runs on the comm stream and records a completion event;
``Handle.wait()`` makes the caller's current stream wait on that event. CPU
backends block in ``Handle.wait()`` instead.

Completion and failure (every backend):

* ``Handle.synchronize(timeout_s)`` blocks the host until the op has completed.
  On a failure or timeout it raises :class:`TransportError` naming the backend,
  op, action name, this rank and the peer / group (global ranks) plus the
  backend's own error text; the NCCL backend aborts all of the rank's
  communicators before raising.
* ``Transport.abort()`` aborts everything, bounded: afterwards no wait or
  synchronize on this transport hangs (NCCL: every communicator of the rank,
  together; gloo/local: pending ops fail).
* ``Transport.group()`` fuses the ops issued inside it (NCCL: one NCCL group over
  every communicator touched; gloo/local: ops are issued at once, the block only
  exists for parity). Handles from inside a group complete only after the block.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, runtime_checkable

import torch

DEFAULT_TIMEOUT_S = 60.0
"""Default bound on init, every wait and barrier (seconds)."""


class TransportError(RuntimeError):
    """A transport operation failed or timed out; the message names the op and peer(s)."""


@runtime_checkable
class Handle(Protocol):
    def wait(self, timeout_s: float | None = None) -> None:
        """GPU: make the caller's current torch stream wait on the op (host does not block
        beyond what the backend documents). CPU: block until done, raising
        TransportError naming op and peer after ``timeout_s`` (default: the transport's)."""

    def is_completed(self) -> bool:
        """True once the op has finished (never blocks). False while the group that issued
        it is still open, and for an op that failed."""

    def synchronize(self, timeout_s: float | None = None) -> None:
        """Block the host until the op has completed (default bound: the transport's
        timeout). On failure or timeout raise TransportError naming backend, op, action name,
        this rank and the peer / group in global ranks, with the backend's own error text
        (NCCL: ncclGetErrorString and ncclGetLastError); the NCCL backend aborts all of the
        rank's communicators first. Calling it inside the group that issued the op raises."""


@runtime_checkable
class Transport(Protocol):
    rank: int
    world_size: int
    device: torch.device
    name: str  # "nccl" | "gloo" | "local"

    def send(self, tensor: Any, peer: int, *, name: str = "") -> Handle: ...

    def recv(self, tensor: Any, peer: int, *, name: str = "") -> Handle: ...

    def all_reduce(self, tensor: Any, group: tuple[int, ...], *, name: str = "") -> Handle: ...

    def reduce_scatter(
        self, out: Any, tensor: Any, group: tuple[int, ...], *, name: str = ""
    ) -> Handle: ...

    def broadcast(self, tensor: Any, root: int, group: tuple[int, ...], *, name: str = "") -> Handle: ...

    def barrier(self) -> None: ...

    def has_group(self, group: tuple[int, ...]) -> bool:
        """Whether collectives over `group` (this rank a member) can be issued here: created
        with groups= (gloo, nccl); any group of valid ranks (local)."""

    def group(self) -> contextlib.AbstractContextManager[None]:
        """Fuse the ops issued inside (see the module docstring); wait on their handles after
        the block."""

    def abort(self, timeout_s: float | None = None) -> None:
        """Abort everything without waiting for peers, bounded by timeout_s (default: the
        transport's timeout); idempotent. Raises TransportError only when some part could
        not be aborted within the bound (NCCL: an ncclCommAbort that did not return)."""

    def close(self) -> None: ...

    def __enter__(self) -> Transport: ...

    def __exit__(self, *exc: object) -> None: ...


def unusable(what: str, aborted: bool) -> str:
    """Why a closed or aborted transport refuses an op, and what to do."""
    if aborted:
        return (f"{what}: the transport is aborted (an earlier failure stopped its ops so that no "
                "peer waits on them); create new transports, on every rank")
    return f"{what}: the transport is closed"


def describe(backend: str, op: str, name: str, rank: int, peer: int | None = None,
             group: tuple[int, ...] | None = None) -> str:
    """The op label used in every error message: ``gloo recv 'mb3' (rank 0, peer 2)``."""
    label = f"{backend} {op}" + (f" '{name}'" if name else "")
    where = f"rank {rank}"
    if peer is not None:
        where += f", peer {peer}"
    if group is not None:
        where += f", group {tuple(group)}"
    return f"{label} ({where})"


def as_tensor(obj: Any) -> torch.Tensor:
    """A torch view of ``obj`` sharing its memory: torch tensors pass through; objects with
    ``__cuda_array_interface__`` (e.g. cupy arrays) or ``__dlpack__`` are wrapped zero-copy."""
    if isinstance(obj, torch.Tensor):
        return obj
    if hasattr(obj, "__cuda_array_interface__"):
        tensor = torch.as_tensor(obj, device="cuda")
        if tensor.data_ptr() != obj.__cuda_array_interface__["data"][0]:
            raise TypeError(f"could not wrap {type(obj).__name__} without a copy")
        return tensor
    if hasattr(obj, "__dlpack__"):
        return torch.from_dlpack(obj)
    raise TypeError(f"expected a torch tensor or a CUDA array (cupy), got {type(obj).__name__}")


def check_contiguous(tensor: torch.Tensor, what: str) -> None:
    if not tensor.is_contiguous():
        raise TransportError(f"{what}: the tensor must be contiguous (shape {tuple(tensor.shape)}, "
                             f"strides {tensor.stride()})")


def check_group(group: tuple[int, ...], rank: int, world_size: int, what: str) -> tuple[int, ...]:
    """Validates a group (distinct global ranks, containing ``rank``) and returns it as a tuple."""
    group = tuple(int(r) for r in group)
    if len(set(group)) != len(group) or not group or any(r < 0 or r >= world_size for r in group):
        raise TransportError(f"{what}: group {group} must list distinct ranks in [0, {world_size})")
    if rank not in group:
        raise TransportError(f"{what}: rank {rank} is not a member of group {group}")
    return group


def find_group(known: dict[tuple[int, ...], Any], group: tuple[int, ...], rank: int,
               world_size: int, what: str) -> tuple[tuple[int, ...], Any]:
    """The process group / communicator created for ``group`` (validated as by check_group)."""
    group = check_group(group, rank, world_size, what)
    found = known.get(group)
    if found is None:
        raise TransportError(f"{what}: no process group or communicator for {group}; pass it in "
                             f"groups= when creating the transport (known: {list(known)})")
    return group, found


def check_peer(peer: int, world_size: int, what: str) -> None:
    if not 0 <= peer < world_size:
        raise TransportError(f"{what}: peer {peer} is outside [0, {world_size})")


def scatter_chunk(tensor: torch.Tensor, out: torch.Tensor, group: tuple[int, ...], rank: int,
                  what: str) -> tuple[list[torch.Tensor], int]:
    """Splits ``tensor`` on dim 0 into len(group) chunks in group order and checks ``out``
    matches one chunk. Returns (chunks, this rank's index in the group)."""
    n = len(group)
    if tensor.dim() == 0 or tensor.shape[0] % n != 0:
        raise TransportError(f"{what}: dim 0 of the input ({tuple(tensor.shape)}) must split "
                             f"evenly into {n} chunks")
    chunks = list(tensor.chunk(n, dim=0))
    if out.shape != chunks[0].shape or out.dtype != tensor.dtype:
        raise TransportError(f"{what}: out is {tuple(out.shape)} {out.dtype}, expected "
                             f"{tuple(chunks[0].shape)} {tensor.dtype}")
    return chunks, group.index(rank)


def complete(handles: list[Handle], timeout_s: float) -> None:
    """Block the host until every op in `handles` is done: wait() (which on GPU backends only
    orders the current stream) and then the backend's host-side synchronize, where it has one."""
    for h in handles:
        h.wait(timeout_s)
    for h in handles:
        sync = getattr(h, "synchronize", None)
        if sync is not None:
            sync(timeout_s)
        elif getattr(h, "events", None) is not None:  # a GPU op already issued: its end event
            h.events[1].synchronize()
