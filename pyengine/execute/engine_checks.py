"""What `pyengine.Engine` checks before any rank works, so a caller's mistake is one exception naming
the argument or field, its value and the rule (an InputError, a ValueError), never a RankError from
the middle of a run, a hang, or a silently wrong answer.

Every rank checks the same things from the same arguments, so every rank refuses alike.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

from pyengine.core.errors import InputError, ResourceError
from pyengine.core.spec import DeploymentSpec
from pyengine.core.units import fmt_bytes

TRANSPORT_FIELDS = ("rank", "world_size", "device", "send", "recv", "broadcast", "abort")
SOURCE_FIELDS = ("weight", "embed_rows", "check_spec")
T = TypeVar("T")


def check_engine(spec: Any, transport: Any, seed: Any, source: Any, device: Any) -> None:
    if not isinstance(spec, DeploymentSpec):
        raise InputError("spec", type(spec).__name__, "must be a DeploymentSpec (pyengine.load_spec(...))")
    missing = [a for a in TRANSPORT_FIELDS if not hasattr(transport, a)]
    if missing:
        raise InputError("transport", type(transport).__name__,
                         f"is not a transport (no {missing[0]}): one of LocalTransport.create(...) "
                         "or pyengine.transport.create_transport(...), this rank's")
    if transport.world_size != spec.world_size:
        raise InputError("transport.world_size", transport.world_size,
                         f"must equal the spec's {spec.world_size} ranks")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError("seed", seed, "must be an integer")
    if source is not None and not all(hasattr(source, a) for a in SOURCE_FIELDS):
        hint = (": open it with pyengine.model.checkpoint.open_checkpoint(folder)"
                if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__") else "")
        raise InputError("source", type(source).__name__, f"must be a weight source{hint}")
    try:
        wanted = torch.device(device) if device is not None else None
    except (RuntimeError, TypeError):
        raise InputError("device", device, "is not a torch device") from None
    if wanted is not None and wanted != torch.device(transport.device):
        raise InputError("device", str(device), f"must be the transport's device ({transport.device})")


def check_groups(transport: Any, table: Any, world_size: int) -> None:
    """The collective groups this rank's actions use (the world, for generation; every REDUCE's
    peers) exist on its transport."""
    from pyengine.schedule.actions import Kind

    has = getattr(transport, "has_group", None)
    if has is None:
        return  # a transport without the query (a test double): its ops will say
    needed = {tuple(range(world_size))} | {a.peers for a in table.get(transport.rank, []) if a.kind is Kind.REDUCE}
    for group in sorted(needed):
        if not has(group):
            raise InputError("transport", f"no group {group}",
                             "create it with groups=spec.comm_groups() (every rank, in that order)")


def check_weights(spec: DeploymentSpec, rank: int, weights: Any) -> None:
    """Ready-made weights: exactly this rank's tensors (rank_weights(spec, source, rank)), each of
    its shard's shape, in the spec's dtype."""
    from pyengine.core.dtypes import torch_dtype
    from pyengine.model.stages import stages_on
    from pyengine.model.tensors import weight_key

    if not isinstance(weights, dict):
        raise InputError("weights", type(weights).__name__, "must be a dict (rank_weights(spec, source, rank))")
    want = {weight_key(name, layer): stage.weight_shapes(rank)[name]
            for stage in stages_on(spec, rank) for name, layer in stage.tensors()}
    dtype = torch_dtype(spec.model.dtype)
    for key, shape in want.items():
        t = weights.get(key)
        if not isinstance(t, torch.Tensor):
            raise InputError(f"weights[{key!r}]", type(t).__name__,
                             f"rank {rank} needs this tensor (rank_weights(spec, source, rank) gives it)")
        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
            raise InputError(f"weights[{key!r}]", f"{list(t.shape)} {t.dtype}",
                             f"rank {rank} holds {list(shape)} {dtype} (its shard; rank_weights(spec, source, rank))")
    extra = sorted(set(weights) - set(want))
    if extra:
        raise InputError("weights", extra[0], f"is not a tensor rank {rank} holds ({len(extra)} extra keys)")


def check_kv_fits(spec: DeploymentSpec, sequences: int, capacity: int, device: torch.device) -> None:
    """The attention rank's KV cache for `sequences` of up to `capacity` tokens against the memory
    this rank's device has free (every rank checks, so every rank refuses alike)."""
    from pyengine.execute.memory import host_available_bytes
    from pyengine.model.kv_cache import cache_bytes

    need = cache_bytes(spec, sequences, capacity)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        have, what = free, f"{device} has {fmt_bytes(free)} free"
    else:
        have = host_available_bytes()
        what = f"this host has {fmt_bytes(have)} available" if have is not None else ""
    if have is not None and need > have:
        rank = spec.stage("embed").gpus[0]
        raise ResourceError(f"rank {rank}'s KV cache ({sequences} sequences x {capacity} positions)",
                            fmt_bytes(need), f"{what}: fewer or shorter prompts, or a smaller max_new_tokens")


def refuse_together(transport: Any, world_size: int, timeout_s: float, check: Callable[[], T]) -> T:
    """`check()` (this rank's own checks of its generate arguments), then a vote of every rank, so
    that all refuse together: a rank whose arguments `check` refused raises its own error, and
    every other rank an InputError saying so, instead of waiting out the timeout for it in the
    first step. The vote also refuses prompts or max_new_tokens that differ from rank 0's: rank 0's
    fingerprint goes to all, and one all-reduce counts the ranks that differ and that refused
    (two small collectives per generate call, none per step; forward does not vote, it would cost
    them on every batch)."""
    from pyengine.transport.base import complete

    try:
        checked, refusal = check(), None
    except InputError as e:  # ResourceError included: a rank short of memory refuses too
        checked, refusal = None, e
    mine = -1 if refusal is not None else _fingerprint(*checked)
    dev, world = transport.device, tuple(range(world_size))
    try:
        root = torch.full((1,), mine, dtype=torch.int64, device=dev)  # a fill: no host copy
        complete([transport.broadcast(root, 0, world, name="generate.prompts")], timeout_s)
        differs = int(int(root.item()) != mine)  # intended sync: once per generate call, before any work
        vote = torch.full((2,), differs, dtype=torch.int64, device=dev)
        vote[1] = int(refusal is not None)  # fills, no host copy: (differs, refused)
        complete([transport.all_reduce(vote, world, name="generate.vote")], timeout_s)
        differ, refused = vote.tolist()  # intended sync: as above
    except Exception as e:
        if refusal is None:
            raise
        refusal.add_note(f"(the other ranks could not be told: {type(e).__name__})")
        raise refusal from None
    if refusal is not None:
        raise refusal
    if refused:
        raise InputError("prompts", f"refused on {refused} rank(s)", "every rank must pass the same valid prompts "
                                                                     "and max_new_tokens (the refusing rank says why)")
    if differ:
        raise InputError("prompts", f"{differ} rank(s) differ from rank 0",
                         "every rank must pass the same prompts and max_new_tokens")
    return checked


def _fingerprint(prompts: list, max_new_tokens: int) -> int:
    """63 bits of a hash of the prompts and max_new_tokens (never -1, the refusing ranks' mark)."""
    import hashlib

    h = hashlib.blake2b(digest_size=7)
    h.update(repr((max_new_tokens, [int(p.numel()) for p in prompts])).encode())
    for p in prompts:
        h.update(p.detach().to("cpu", torch.int64).contiguous().numpy().tobytes())
    return int.from_bytes(h.digest(), "little")


def check_graphs(graphs, device):
    """Engine(graphs=...): a GraphMode, and `on` only where the decode steps can be captured."""
    from pyengine.execute.graphs import GraphMode, decide
    from pyengine.model.kernel_path import kernel_path
    from pyengine.model.ops import ops_class

    choices = [m.value for m in GraphMode]
    if not isinstance(graphs, str) or graphs not in choices:
        raise InputError("graphs", graphs, f"must be one of {', '.join(choices)}")
    mode = GraphMode(graphs)
    decide(mode, device, ops_class(kernel_path(device)))
    return mode
