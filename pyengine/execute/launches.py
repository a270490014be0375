"""Kernel launches counted on the host, per action: aten ops that launch a kernel plus Triton launches.

On a GPU each launch costs a few microseconds of host time whatever its size, so at decode the count,
not the FLOPs, decides the attention rank's speed. Counted on any device (the Triton path runs on CPU
under the interpreter), so CI pins the budget the GPU runs:

    counter = LaunchCounter()
    runtime.launches = counter          # the runtime counts inside each compute action
    ...; counter.by_action              # {action id: launches}

Views, allocations without a fill and metadata ops launch nothing and are not counted.
"""

from __future__ import annotations

import contextlib
import sys
from collections import Counter

from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "lift_fresh",
    "lift_fresh_copy", "detach", "alias", "_unsafe_view", "view", "as_strided", "resize_", "set_",
    "_local_scalar_dense", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream",
})


class _AtenCount(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not (func.is_view or name in NO_KERNEL or _inside_interpreter()):
            self.count += 1
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def _inside_interpreter() -> bool:
    """The Triton interpreter (CPU) moves a kernel's arguments with torch ops of its own: on a GPU
    those are not launches (the kernel is one, counted by the launcher)."""
    frame = sys._getframe(2)
    while frame is not None:
        if "triton" in frame.f_code.co_filename and "interpreter" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def _triton_counting():
    """The Triton launchers' own counter (every launcher in pyengine.kernels reports to it)."""
    from pyengine.kernels.launch_count import counting

    return counting()


class LaunchCounter:
    """Launches per action id (str), and which aten ops they were (for the budget's breakdown)."""

    def __init__(self):
        self.by_action: Counter = Counter()
        self.ops: Counter = Counter()

    @contextlib.contextmanager
    def action(self, name: str):
        aten = _AtenCount()
        with _triton_counting() as triton, aten:
            yield
        triton_n = triton.triton
        self.by_action[name] += aten.count + triton_n
        self.ops.update(aten.ops)
        if triton_n:
            self.ops["triton"] += triton_n

    def total(self) -> int:
        return sum(self.by_action.values())
