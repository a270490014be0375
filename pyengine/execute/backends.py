"""Where a job's ranks run, and everything that follows from that choice: the one home of a
backend's traits (its devices, its memory budget, what its ranks are called, its CLI choices).
Callers ask the backend; nothing else branches on a backend's name. Importing this module does
not import torch (the CLIs build their parsers from it).

nccl      a process per rank, one CUDA GPU each;
local     virtual ranks as threads of this process, sharing one device (a GPU, else the CPU);
gloo      a process per rank on this host's CPU.
"""

from __future__ import annotations

import enum

from pyengine.execute import memory
from pyengine.execute.memory import PROCESS_BYTES, Budget


class Backend(str, enum.Enum):
    NCCL = "nccl"
    GLOO = "gloo"
    LOCAL = "local"

    def __str__(self) -> str:  # "nccl" in messages and reports, not "Backend.NCCL"
        return self.value

    @property
    def gpu_per_rank(self) -> bool:
        """Every rank has a GPU of its own (so each is called a GPU, and its memory is its own)."""
        return self is Backend.NCCL

    @property
    def process_per_rank(self) -> bool:
        """Each rank is a process of its own (else a thread of this one)."""
        return self is not Backend.LOCAL

    def on_gpu(self) -> bool:
        """The ranks' tensors live on a GPU: nccl always, local when this machine has one, gloo never."""
        if self is Backend.GLOO:
            return False
        if self.gpu_per_rank:
            return True
        import torch

        return torch.cuda.is_available()

    @property
    def rank_unit(self) -> str:
        """What a rank is called in reports: a GPU when it has one to itself, else a rank."""
        return "GPU" if self.gpu_per_rank else "rank"

    @property
    def shares_one_device(self) -> bool:
        """All ranks share one device (a GPU or the CPU): timings test the engine, not a speed-up."""
        return not self.gpu_per_rank

    def memory_budget(self, world_size: int) -> Budget | None:
        """The memory this job's ranks may use on this machine (None when it cannot be read):
        nccl: the smallest visible GPU's, per rank; local: the one device's (the GPU's, else
        the host's available memory), shared; gloo: the host's available memory, shared, each
        rank process costing PROCESS_BYTES besides its tensors."""
        if self.gpu_per_rank:
            cap = memory.gpu_bytes(world_size)
            return None if cap is None else Budget(cap, False, "GPU memory per rank (torch.cuda)")
        if not self.process_per_rank:
            cap = memory.gpu_bytes(1)
            if cap is not None:
                return Budget(cap, True, "memory of the one GPU all virtual ranks share")
        host = memory.host_available_bytes()
        if host is None:
            return None
        if not self.process_per_rank:
            return Budget(host - PROCESS_BYTES, True, "available host memory (MemAvailable)")
        return Budget(host, True, "available host memory (MemAvailable)", per_rank_overhead=PROCESS_BYTES)


BACKEND_CHOICES = ("auto", *(b.value for b in Backend))
"""What --backend accepts (run, generate, bench comm)."""

BACKEND_HELP = "where the ranks run: auto = nccl with a GPU per rank, local (threads) on one GPU, gloo on CPU"
