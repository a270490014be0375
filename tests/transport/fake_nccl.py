"""A fake pyengine._C and fake CUDA streams/events, for NcclTransport's own logic on CPU.

Two uses. Recording (the default): every call is logged as a tuple in `FakeC.log` and nothing
moves, so a test can assert the order of calls (ready event -> op -> completion event) and
complete events by hand (`FakeC.done`). Moving data (`FakeC(moves_data=True)`): the fake
communicators of several ranks (threads of one process) meet on one fabric that does what NCCL
does to memory: a send matches the peer's recv in issue order, a collective runs once every
member issued it, and a completion event is done when the op it follows is. Tensors are
`DeviceTensor`s: real CPU memory that says it lives on a CUDA device, so the transport's device
checks pass and the fabric reads and writes the memory behind `data_ptr()`."""

from __future__ import annotations

import collections
import ctypes
import itertools
import threading
import time
from types import SimpleNamespace

import torch

_ids = itertools.count(1)
DTYPE_NAMES = ("float32", "float16", "bfloat16", "int32", "int64", "uint8", "float64")


class FakeError(RuntimeError):
    pass


class FakeStream:
    def __init__(self, device=None, priority=0):
        self.cuda_stream = next(_ids)


class FakeTorchEvent:
    def __init__(self, enable_timing=False):
        self.recorded_on = None

    def record(self, stream=None):
        self.recorded_on = stream


class Work:
    """One op on the fake device: done once its data moved."""

    def __init__(self):
        self.done = threading.Event()


def _view(ptr: int, count: int, dtype: torch.dtype) -> torch.Tensor:
    """The `count` elements of `dtype` at host address `ptr`, as a writable tensor (no copy)."""
    nbytes = count * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_byte * nbytes).from_address(ptr), dtype=dtype, count=count)


class Fabric:
    """What the devices and the network do, shared by every rank's fake communicators."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sends = collections.defaultdict(collections.deque)  # (src, dst) -> (data, work)
        self.recvs = collections.defaultdict(collections.deque)  # (src, dst) -> (view, work)
        self.collectives: dict[tuple, dict] = {}  # (group, seq) -> member -> contribution

    def send(self, src: int, dst: int, data: torch.Tensor) -> Work:
        work = Work()
        with self.lock:
            self.sends[(src, dst)].append((data.clone(), work))  # NCCL reads the buffer once
            self._match(src, dst)
        return work

    def recv(self, src: int, dst: int, out: torch.Tensor) -> Work:
        work = Work()
        with self.lock:
            self.recvs[(src, dst)].append((out, work))
            self._match(src, dst)
        return work

    def _match(self, src: int, dst: int) -> None:
        sends, recvs = self.sends[(src, dst)], self.recvs[(src, dst)]
        while sends and recvs:
            (data, sent), (out, received) = sends.popleft(), recvs.popleft()
            out.copy_(data)
            sent.done.set()
            received.done.set()

    def collective(self, group: tuple, seq: int, member: int, contribution) -> Work:
        work = Work()
        with self.lock:
            arrived = self.collectives.setdefault((group, seq), {})
            arrived[member] = (contribution, work)
            if len(arrived) == len(group):
                del self.collectives[(group, seq)]
                _reduce([arrived[i][0] for i in range(len(group))])
                for _, w in arrived.values():
                    w.done.set()
        return work


def _reduce(members: list) -> None:
    """Runs one collective given each member's (kind, input, output, root) in group order."""
    kind = members[0][0]
    if kind == "broadcast":
        root = members[0][3]
        data = members[root][1].clone()
        for _, _, out, _ in members:
            out.copy_(data)
        return
    total = sum(m[1].double() for m in members).to(members[0][1].dtype)
    for i, (_, _, out, _) in enumerate(members):
        out.copy_(total if kind == "all_reduce" else total.chunk(len(members))[i])


class FakeC:
    """Records every call as a tuple in self.log; with moves_data, also moves the data."""

    Error = FakeError

    def __init__(self, moves_data: bool = False):
        self.log: list[tuple] = []
        self.moves_data = moves_data
        self.fabric = Fabric()
        self._local = threading.local()  # NCCL groups are per thread
        self.group_end_error: str | None = None
        self.wait_error: str | None = None
        self.done: set[int] = set()  # event ids completed by hand (recording)
        self.stream_work: dict[int, list[Work]] = collections.defaultdict(list)  # stream -> its ops
        self.sets: list = []
        self.Event, self.CommSet, self.Communicator = _event(self), _comm_set(self), _communicator(self)
        self.RedOp = SimpleNamespace(sum="sum")
        self.DType = SimpleNamespace(**{name: getattr(torch, name) for name in DTYPE_NAMES})

    @property
    def depth(self) -> int:
        return getattr(self._local, "depth", 0)

    def group_start(self):
        self._local.depth = self.depth + 1
        self.log.append(("group_start",))

    def group_end(self):
        self._local.depth = self.depth - 1
        self.log.append(("group_end",))
        if self.group_end_error:
            raise FakeError(self.group_end_error)

    def group_depth(self):
        return self.depth


def _event(fake: FakeC):
    class Event:
        def __init__(self, device=0, enable_timing=False):
            self.id = next(_ids)
            self.recorded = None
            self.after: list[Work] = []  # as on CUDA: done when the stream's earlier work is

        def record(self, stream):
            self.recorded = stream
            pending = [w for w in fake.stream_work[stream] if not w.done.is_set()]
            fake.stream_work[stream] = self.after = pending
            fake.log.append(("record", self.id, stream))

        def wait(self, stream):
            fake.log.append(("stream_waits", stream, self.id))
            for work in self.after:  # the host reads only after the stream: wait here
                work.done.wait(60)

        def query(self):
            if self.recorded is None:
                return False
            if not fake.moves_data:
                return self.id in fake.done
            return all(w.done.is_set() for w in self.after)

    return Event


def _comm_set(fake: FakeC):
    class CommSet:
        def __init__(self):
            self.members = []
            self.aborts = 0
            fake.sets.append(self)

        def abort(self, timeout_s):
            self.aborts += 1
            for m in self.members:
                m.alive = False
            fake.log.append(("abort_set", timeout_s))
            return []

    return CommSet


def _communicator(fake: FakeC):
    class Communicator:
        @staticmethod
        def unique_id():
            return b"x" * 128

        def __init__(self, uid, nranks, rank, device, timeout_s, ranks=None, comm_set=None):
            self.ranks, self.rank, self.device, self.alive = list(ranks), rank, device, True
            self.seq = 0  # collectives issued: the fabric matches members by it
            self.comm_set = comm_set
            comm_set.members.append(self)
            fake.log.append(("init", tuple(self.ranks)))

        def _op(self, op, peer, stream, name, move=None):
            """Logs (op, group, local peer or None, stream, name, group depth); moves the data."""
            if not self.alive:
                raise FakeError(f"NCCL {op} '{name}': the communicator was aborted")
            fake.log.append((op, tuple(self.ranks), peer, stream, name, fake.depth))
            if fake.moves_data and move is not None:
                fake.stream_work[stream].append(move())

        def _collective(self, kind, inp, out, root):
            self.seq += 1
            return fake.fabric.collective(tuple(self.ranks), self.seq, self.rank, (kind, inp, out, root))

        def send(self, ptr, count, dtype, peer, stream, name):
            self._op("send", peer, stream, name, lambda: fake.fabric.send(
                self.ranks[self.rank], self.ranks[peer], _view(ptr, count, dtype)))

        def recv(self, ptr, count, dtype, peer, stream, name):
            self._op("recv", peer, stream, name, lambda: fake.fabric.recv(
                self.ranks[peer], self.ranks[self.rank], _view(ptr, count, dtype)))

        def all_reduce(self, sp, rp, count, dtype, op, stream, name):
            self._op("all_reduce", None, stream, name, lambda: self._collective(
                "all_reduce", _view(sp, count, dtype).clone(), _view(rp, count, dtype), None))

        def reduce_scatter(self, sp, rp, count, dtype, op, stream, name):
            n = len(self.ranks)
            self._op("reduce_scatter", None, stream, name, lambda: self._collective(
                "reduce_scatter", _view(sp, count * n, dtype).clone(), _view(rp, count, dtype), None))

        def broadcast(self, sp, rp, count, dtype, root, stream, name):
            self._op("broadcast", root, stream, name, lambda: self._collective(
                "broadcast", _view(sp, count, dtype), _view(rp, count, dtype), root))

        def wait(self, event, timeout_s, op, name, peer):
            fake.log.append(("wait", tuple(self.ranks), op, name, peer, timeout_s))
            if fake.wait_error:
                for s in fake.sets:
                    s.abort(timeout_s)
                raise FakeError(fake.wait_error)
            if fake.moves_data:
                self._poll(event, timeout_s, op, name, peer)

        def _poll(self, event, timeout_s, op, name, peer):
            """What the native wait does: until the event is done, an abort, or the timeout
            (which aborts the whole set); the messages name global ranks, as NCCL's do."""
            where = (f"NCCL {op} '{name}' (rank {self.ranks[self.rank]}"
                     + (f", peer {self.ranks[peer]}" if peer >= 0 else "")
                     + f", group {tuple(self.ranks)}, device {self.device})")
            deadline = time.monotonic() + timeout_s
            while not event.query():
                if not self.alive:
                    raise FakeError(f"{where} interrupted: the communicator was aborted")
                if time.monotonic() > deadline:
                    self.comm_set.abort(timeout_s)
                    raise FakeError(f"{where} timed out after {timeout_s:g} s (a peer is missing, "
                                    "stalled, or issued its ops in another order)")
                time.sleep(0.001)

        def destroy(self):
            self.alive = False
            fake.log.append(("destroy", tuple(self.ranks)))

    return Communicator


class FakeTensor:
    """What NcclTransport reads from a tensor, on a pretend GPU (rank 1's by default); no data."""

    def __init__(self, n=4, dtype=torch.float32, device=torch.device("cuda", 1)):
        self.device, self.dtype, self.shape = torch.device(device), dtype, (n,)
        self._n = n
        self.recorded_streams = []

    def __getitem__(self, item):
        return FakeTensor(1, self.dtype, self.device)

    def is_contiguous(self):
        return True

    def data_ptr(self):
        return 4096

    def numel(self):
        return self._n

    def dim(self):
        return 1

    def record_stream(self, stream):
        self.recorded_streams.append(stream)


class DeviceTensor:
    """Real CPU memory that says it lives on `device` (a CUDA device): the fabric moves its data."""

    held: list[torch.Tensor] = []
    """Memory an op was issued on, kept until the fake is installed again: the fabric may write
    it after its owner dropped it, as NCCL may (record_stream keeps it from the allocator)."""

    def __init__(self, data: torch.Tensor, device):
        self.data, self.device = data, torch.device(device)

    dtype = property(lambda self: self.data.dtype)
    shape = property(lambda self: self.data.shape)

    def __getitem__(self, item):
        return DeviceTensor(self.data[item], self.device)

    def chunk(self, n, dim=0):
        return [DeviceTensor(c, self.device) for c in self.data.chunk(n, dim)]

    def is_contiguous(self):
        return self.data.is_contiguous()

    def stride(self):
        return self.data.stride()

    def data_ptr(self):
        return self.data.data_ptr()

    def numel(self):
        return self.data.numel()

    def dim(self):
        return self.data.dim()

    def record_stream(self, stream):
        DeviceTensor.held.append(self.data)

    def cpu(self):
        return self.data.clone()


def install(monkeypatch, C: FakeC) -> None:
    """NcclTransport sees `C` as pyengine._C and the fake CUDA streams and events; a tensor
    made on a CUDA device by torch.ones/zeros (its connect and barrier buffers) is a
    DeviceTensor when C moves data, else a FakeTensor."""
    import pyengine.transport.nccl as nccl_mod

    DeviceTensor.held.clear()
    monkeypatch.setattr(nccl_mod, "native", lambda: C)
    monkeypatch.setattr(nccl_mod, "as_tensor", lambda obj: obj)
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "Event", FakeTorchEvent)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    current = FakeStream()
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: current)
    C.current = current
    for name in ("ones", "zeros"):
        real = getattr(torch, name)

        def on_device(*size, device=None, _real=real, **kw):
            if device is None or torch.device(device).type != "cuda":
                return _real(*size, device=device, **kw)
            if C.moves_data:
                return DeviceTensor(_real(*size, **kw), device)
            return FakeTensor(size[0] if size else 1, device=device)

        monkeypatch.setattr(torch, name, on_device)
