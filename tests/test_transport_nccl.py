"""nccl transport: argument checks on CPU; a 1-rank transport on one GPU (gpu marker).
Multi-GPU runs need >= 2 GPUs and torchrun (see pyengine.commbench)."""

import pytest
import torch
import torch.distributed as dist

from pyengine.transport import TransportError, create_transport
from pyengine.transport.nccl import nccl_dtype


def test_dtype_mapping():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.int32, torch.int64,
                  torch.uint8, torch.float64):
        assert nccl_dtype(dtype).name == str(dtype).removeprefix("torch.")
    with pytest.raises(TransportError, match="not supported"):
        nccl_dtype(torch.complex64)


def test_needs_a_cuda_device():
    with pytest.raises(TransportError, match="needs a CUDA device"):
        create_transport("nccl", rank=0, world_size=1, device="cpu", groups=[], store=dist.HashStore())


def test_unknown_backend_and_local_hint():
    with pytest.raises(TransportError, match="unknown transport backend"):
        create_transport("mpi", rank=0, world_size=1, device=None, groups=[])
    with pytest.raises(TransportError, match="LocalTransport.create"):
        create_transport("local", rank=0, world_size=1, device=None, groups=[])


def test_missing_store_env_is_explained(monkeypatch):
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(TransportError, match="MASTER_ADDR is not set"):
        create_transport("gloo", rank=0, world_size=1, device=None, groups=[])


# -- GPU ------------------------------------------------------------------------------------------

def _one_rank():
    return create_transport("nccl", rank=0, world_size=1, device=0, groups=[(0,)],
                            store=dist.HashStore(), timeout_s=30)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int32])
@pytest.mark.parametrize("count", [1, 1023])
def test_one_rank_collectives(dtype, count):
    with _one_rank() as tr:
        assert (tr.name, tr.rank, tr.world_size, tr.device) == ("nccl", 0, 1, torch.device("cuda", 0))
        x = torch.arange(count, device="cuda").to(dtype)
        expected = x.clone()
        tr.all_reduce(x, (0,), name="ar").wait()
        out = torch.empty_like(x)
        tr.reduce_scatter(out, x, (0,), name="rs").wait()
        h = tr.broadcast(x, 0, (0,), name="bc")
        h.wait()
        h.synchronize(10)
        assert h.is_completed()
        assert torch.equal(x, expected) and torch.equal(out, expected)
        tr.barrier()


@pytest.mark.gpu
def test_one_rank_send_to_self_in_a_group():
    with _one_rank() as tr:
        src = torch.arange(1023, dtype=torch.float16, device="cuda")
        dst = torch.zeros_like(src)
        with tr.group():
            hs = [tr.send(src, 0, name="self"), tr.recv(dst, 0, name="self")]
        for h in hs:
            h.wait()
        assert torch.equal(src, dst)


@pytest.mark.gpu
def test_handle_wait_orders_current_stream_without_host_sync():
    with _one_rank() as tr:
        x = torch.zeros(1 << 22, device="cuda")
        torch.cuda._sleep(20_000_000)  # x is produced late on the current stream
        x.add_(2.0)
        h = tr.all_reduce(x, (0,), name="late")
        h.wait()
        y = x * 3  # ordered after the all_reduce by the handle
        assert float(y.min()) == 6.0


@pytest.mark.gpu
def test_cupy_arrays_through_nccl_transport():
    cp = pytest.importorskip("cupy")
    with _one_rank() as tr:
        x = cp.arange(1023, dtype=cp.float32)
        cp.cuda.Device().synchronize()
        tr.all_reduce(x, (0,), name="cupy").synchronize(10)
        assert bool((x == cp.arange(1023, dtype=cp.float32)).all())
