"""CUDA graphs of a rank's static decode steps: piecewise, one graph per compute action (a layer part of
one group), communication between them left outside (issued eagerly, as every transport needs).

    graphs = SegmentGraphs(CudaGraphs(stream))      # per decode runtime (one per shape)
    out = graphs.run(action_key, compute)           # eager warm-up, then capture once, then replay

A compute's inputs must sit at the same addresses in every step (the static buffers, the receive
pool, earlier graphs' outputs, the weights and the cache) and it must not sync with the host: what
a graph replays is what was captured. The CPU stand-in (`CheckedReplays`) runs the same bookkeeping
without a GPU: it refuses a host sync inside a segment and any input that moved between steps, and
writes each replay's results into the captured outputs, so a runtime that read a stale tensor instead
of the captured one fails there as it would on a GPU.
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from pyengine.kernels.launch_count import count_launch

WARMUP_STEPS = 1
"""Eager runs of a segment before its capture: kernels compiled, the allocator warm, buffers made."""


class GraphMode(str, enum.Enum):
    AUTO = "auto"
    ON = "on"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class GraphDecision:
    enabled: bool
    reason: str
    """Why not (one line), or what is captured."""


def decide(mode: GraphMode, device: torch.device, ops) -> GraphDecision:
    """Whether a rank's decode steps are captured. `on` where they cannot be is an error (one line,
    naming the cause); `auto` falls back to eager with the reason."""
    from pyengine.core.errors import InputError

    if mode is GraphMode.OFF:
        return GraphDecision(False, "CUDA graphs off (--graphs off)")
    why = None
    if device.type != "cuda":
        why = f"CUDA graphs need a GPU; the ranks run on {device.type}"
    elif not ops.graphable:
        why = f"CUDA graphs need static decode kernels; the {ops.path.value} path's: {ops.not_graphable}"
    if why is None:
        return GraphDecision(True, "decode steps captured: one CUDA graph per layer part and group, "
                                   "communication between them")
    if mode is GraphMode.ON:
        raise InputError("graphs", mode.value, why)
    return GraphDecision(False, f"eager decode: {why}")


# ---- backends -----------------------------------------------------------------------------------
class CudaGraphs:
    """torch.cuda.CUDAGraph on the rank's compute stream, one memory pool per runtime (its graphs
    replay in the order they were captured, every step)."""

    def __init__(self, stream):
        self.stream = stream
        self.pool = torch.cuda.graph_pool_handle()

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        g = torch.cuda.CUDAGraph()
        # capture_begin/end, not torch.cuda.graph(): that one synchronizes the whole device and
        # empties the allocator's cache on entry, while the other ranks' threads keep working.
        # thread_local: their CUDA calls meanwhile do not invalidate this capture.
        with torch.cuda.stream(self.stream):
            g.capture_begin(pool=self.pool, capture_error_mode="thread_local")
            try:
                out = fn()
            finally:
                g.capture_end()
            g.replay()  # capture records without running: this step's results come from a replay
        return g, out

    def replay(self, graph: Any, fn: Callable[[], Any], out: Any) -> None:
        graph.replay()


class CheckedReplays:
    """The CPU stand-in: a "replay" re-runs the segment under the same checks as a capture and copies
    its results into the captured outputs."""

    def capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        with no_host_sync():
            return None, fn()

    def replay(self, graph: Any, fn: Callable[[], Any], out: Any) -> None:
        with no_host_sync():
            fresh = fn()
        for old, new in zip(_tensors(out), _tensors(fresh)):
            old.copy_(new)


SYNCING_OPS = ("_local_scalar_dense", "nonzero", "item", "equal", "is_nonzero", "_assert_async")


class HostSyncInSegment(RuntimeError):
    pass


@contextlib.contextmanager
def no_host_sync():
    """Raise on an aten op that brings a device value to the host (on a GPU: a sync, which a graph
    capture refuses)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Guard(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.__name__.split(".")[0] in SYNCING_OPS:
                raise HostSyncInSegment(f"{func.__name__} inside a graphed segment: a host sync")
            return func(*args, **(kwargs or {}))

    with _Guard():
        yield


# ---- the segments of one runtime ----------------------------------------------------------------
@dataclass(slots=True)
class _Segment:
    runs: int = 0
    graph: Any = None
    out: Any = None
    inputs: tuple[int, ...] = ()
    captured: bool = False


@dataclass
class SegmentGraphs:
    backend: Any
    segments: dict[Any, _Segment] = field(default_factory=dict)
    failed: str = ""
    """Why capturing stopped (a capture that raised): its segments and all later ones run eagerly."""

    def run(self, key: Any, fn: Callable[[], Any], inputs: tuple) -> Any:
        """The segment's outputs: eager while warming up, then captured once, then replayed. `inputs`:
        the tensors it reads that others write (their addresses must never change)."""
        seg = self.segments.setdefault(key, _Segment())
        addresses = tuple(t.data_ptr() for t in _tensors(inputs))
        if seg.captured:
            if addresses != seg.inputs:
                raise RuntimeError(f"segment {key}: an input moved since its capture "
                                   f"({_moved(seg.inputs, addresses)}): a graph would read the old one")
            self.backend.replay(seg.graph, fn, seg.out)
            count_launch()  # one graph launch replaces the segment's kernels
            return seg.out
        seg.runs += 1
        if seg.runs <= WARMUP_STEPS or self.failed:
            return fn()
        try:
            seg.graph, seg.out = self.backend.capture(fn)
        except HostSyncInSegment:
            raise
        except RuntimeError as e:  # the GPU refused the capture: eager from here on, and say why
            self.failed = f"capture of {key} failed ({str(e).splitlines()[0][:160]}): eager from there on"
            return fn()
        seg.inputs, seg.captured = addresses, True
        return seg.out

    @property
    def captured(self) -> int:
        return sum(s.captured for s in self.segments.values())


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _tensors(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _moved(before: tuple[int, ...], after: tuple[int, ...]) -> str:
    idx = [i for i, (a, b) in enumerate(zip(before, after)) if a != b]
    return f"input(s) {idx}" if len(before) == len(after) else f"{len(before)} inputs, now {len(after)}"
