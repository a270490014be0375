"""Type stub for pyengine._C (csrc/): CUDA streams/events and NCCL communicators.

Import through ``pyengine._native.native()`` (it preloads libnccl.so.2 first).
Every CUDA/NCCL failure raises :class:`Error` with file:line and the decoded error;
on a machine without a CUDA driver, GPU calls raise it with "no CUDA driver/device".
"""

from typing import ClassVar

class Error(RuntimeError): ...

# -- version (csrc/version.cpp) ------------------------------------------------------------
def nccl_version() -> tuple[int, int, int]:
    """NCCL library version as (major, minor, patch)."""

def cuda_runtime_version() -> tuple[int, int]:
    """CUDA runtime version this module was built against, as (major, minor)."""

def driver_version() -> int:
    """CUDA driver version (e.g. 13000); 0 when no driver is installed."""

def device_count() -> int:
    """Visible CUDA devices; raises Error when there is no driver/device."""

# -- streams and events (csrc/stream.cpp) -----------------------------------------------------
class Stream:
    """A CUDA stream: owned (created here, non-blocking) or wrapping an external handle."""

    def __init__(self, device: int = 0, priority: int = 0) -> None:
        """Create on `device`; lower priority values run first (clamped to the device range)."""
    @staticmethod
    def from_handle(handle: int, device: int = 0) -> Stream:
        """Wrap an existing cudaStream_t (e.g. torch.cuda.Stream.cuda_stream) without owning it."""
    def synchronize(self) -> None:
        """Block until all queued work is done (GIL released)."""
    def query(self) -> bool:
        """True when all queued work has completed."""
    @property
    def handle(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def priority(self) -> int: ...
    @property
    def owned(self) -> bool: ...

class Event:
    """A CUDA event; timing disabled unless enable_timing=True."""

    def __init__(self, device: int = 0, enable_timing: bool = False) -> None: ...
    def record(self, stream: Stream | int) -> None:
        """Record on `stream` (a Stream or an int handle; 0 = legacy default stream)."""
    def wait(self, stream: Stream | int) -> None:
        """Make `stream` wait for this event; the host does not block."""
    def query(self) -> bool: ...
    def synchronize(self) -> None:
        """Block until the recorded work is done (GIL released)."""
    def elapsed_ms(self, end: Event) -> float:
        """Milliseconds from this event to `end` (both need enable_timing=True)."""
    @property
    def handle(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def timing(self) -> bool: ...

# -- NCCL (csrc/nccl.cpp) ---------------------------------------------------------------------
class DType:
    float32: ClassVar[DType]
    float16: ClassVar[DType]
    bfloat16: ClassVar[DType]
    int32: ClassVar[DType]
    int64: ClassVar[DType]
    uint8: ClassVar[DType]
    float64: ClassVar[DType]
    def __init__(self, value: int) -> None: ...
    def __int__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

class RedOp:
    sum: ClassVar[RedOp]
    max: ClassVar[RedOp]
    min: ClassVar[RedOp]
    prod: ClassVar[RedOp]
    def __init__(self, value: int) -> None: ...
    def __int__(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def value(self) -> int: ...

def dtype_size(dtype: DType) -> int:
    """Bytes per element."""

class CommSet:
    """The communicators of one rank (one transport). A failure or timeout on any member
    aborts every member together, each on its own thread (an abort can wait for device work
    that is stuck behind another member's op)."""

    def __init__(self) -> None: ...
    def abort(self, timeout_s: float) -> list[str]:
        """Abort every member on its own thread, waiting at most timeout_s (GIL released).
        Returns one line per member whose ncclCommAbort did not return in time (its thread is
        left running, detached) or failed; empty when all are aborted."""
    def __len__(self) -> int: ...

def group_start() -> None:
    """Open (or nest) this thread's NCCL group: ops on any communicator are deferred."""

def group_end() -> None:
    """Close this thread's group (GIL released). The outermost end calls ncclGroupEnd and
    polls every communicator touched inside until ready. On failure every communicator of
    the touched communicators' sets is aborted and Error names them."""

def group_depth() -> int:
    """Nesting depth of this thread's open NCCL group (0: none)."""

class Communicator:
    """A non-blocking NCCL communicator. Release it with destroy() or abort(); the
    destructor never waits (an undestroyed communicator is leaked with a warning).

    Ranks: `rank`, `peer` and `root` arguments are communicator-local (NCCL's indices);
    every message prints global ranks from `ranks`. Every method that locks or may wait
    releases the GIL."""

    @staticmethod
    def unique_id() -> bytes:
        """128 opaque bytes to hand to every rank (host only: works without a GPU)."""
    def __init__(self, unique_id: bytes, nranks: int, rank: int, device: int,
                 timeout_s: float = 60.0, ranks: list[int] | None = None,
                 comm_set: CommSet | None = None) -> None:
        """Join as local `rank` of `nranks` on `device`; polls the non-blocking init until
        ready. After timeout_s the init is aborted and Error names this rank. `ranks`: the
        global rank of each member (default 0..nranks-1), for messages. `comm_set`: the
        rank's CommSet to join (default: a set of its own)."""
    def send(self, ptr: int, count: int, dtype: DType, peer: int, stream: Stream | int,
             name: str = "") -> None:
        """Returns once enqueued on `stream` (outside a group the non-blocking call is polled
        until the communicator is ready, spinning first). On an NCCL error the set is
        aborted and Error raised."""
    def recv(self, ptr: int, count: int, dtype: DType, peer: int, stream: Stream | int,
             name: str = "") -> None: ...
    def all_reduce(self, send_ptr: int, recv_ptr: int, count: int, dtype: DType, op: RedOp,
                   stream: Stream | int, name: str = "") -> None: ...
    def reduce_scatter(self, send_ptr: int, recv_ptr: int, recv_count: int, dtype: DType,
                       op: RedOp, stream: Stream | int, name: str = "") -> None:
        """send_ptr holds nranks * recv_count elements; recv_count land on each rank."""
    def broadcast(self, send_ptr: int, recv_ptr: int, count: int, dtype: DType, root: int,
                  stream: Stream | int, name: str = "") -> None: ...
    def async_error(self) -> str | None:
        """None while healthy, else the decoded asynchronous NCCL error
        ("communicator aborted" once aborted)."""
    def wait(self, target: Event | Stream | int, timeout_s: float, op: str, name: str = "",
             peer: int = -1) -> None:
        """Block (GIL released) until `target` completes (an Event, or the work queued so far
        on a Stream / int stream handle), polling the async errors of every communicator of
        this rank's set. On an error, an abort from another thread, or after timeout_s the
        whole set is aborted and Error names `op`, `name`, this rank and the local `peer`
        (-1: none) in global ranks, with NCCL's own text, e.g.
        "NCCL recv 'mb3' (rank 1, peer 2, group (0, 1, 2), device 1) timed out after 60 s
        (...); NCCL reports: no error; aborted every NCCL communicator of rank 1
        (group (0, 1, 2), group (1, 2)) (nccl.cpp:NNN)"."""
    def abort(self) -> None:
        """Abort this communicator only, without waiting for peers (idempotent). Runs on a
        helper thread (ncclCommAbort must not nest into a group open on the caller's thread),
        waiting at most timeout_s; Error when it failed or did not return in time."""
    def destroy(self) -> None:
        """Flush outstanding work (bounded by timeout_s, else the set is aborted and Error
        raised), then free; idempotent."""
    @property
    def rank(self) -> int:
        """Local (NCCL) index of this member."""
    @property
    def nranks(self) -> int: ...
    @property
    def device(self) -> int: ...
    @property
    def timeout_s(self) -> float: ...
    @property
    def ranks(self) -> list[int]:
        """Global rank of each member, in communicator order."""
    @property
    def global_rank(self) -> int: ...
    @property
    def label(self) -> str:
        """"group (0, 1, 2) on rank 1, device 1"."""
    @property
    def comm_set(self) -> CommSet: ...
    @property
    def alive(self) -> bool: ...

# -- the wait loop (csrc/poll.hpp, csrc/poll.cpp) ------------------------------------------
def _poll_overhead(ready_after_us: float, iters: int, policy: str = "fast",
                   spin_us: float | None = None, yield_us: float | None = None,
                   first_sleep_us: float | None = None, max_sleep_us: float | None = None,
                   timer_slack_ns: int | None = None) -> dict[str, float | int | str]:
    """Benchmark of the wait loop every NCCL/CUDA wait uses (no GPU needed; GIL released):
    `iters` waits for a condition that becomes true ready_after_us after each wait starts,
    under policy "fast" (spin, then yield, then growing sleeps under 1 us timer slack) or
    "legacy" (the sleep-first loop it replaced), with optional parameter overrides.
    Returns policy, ready_after_us, iters, late_us_{mean,p50,p99,max} (how long after the
    condition the loop returned), wall_us_mean, cpu_us_mean (thread CPU time per wait) and
    probes_mean."""
