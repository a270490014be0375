"""A rank's streams are distinct CUDA streams, made once per (device, rank, role) and reused."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pyengine.transport.streams import check_distinct, transport_streams


def _fake(handle: int, device: int = 0):
    return SimpleNamespace(cuda_stream=handle, device_index=device)


def test_distinct_streams_pass():
    check_distinct(0, {"compute": _fake(1), "side": _fake(2), "comm": _fake(3), "none": None})


def test_shared_stream_names_both_roles():
    with pytest.raises(RuntimeError, match=r"rank 2: streams 'compute' and 'comm\[0, 1\]'"):
        check_distinct(2, {"compute": _fake(7), "side": _fake(8), "comm[0, 1]": _fake(7)})


def test_same_handle_on_another_device_is_another_stream():
    check_distinct(0, {"compute": _fake(7, 0), "comm": _fake(7, 1)})


def test_transport_streams_reads_local_and_nccl_shapes():
    local = SimpleNamespace(stream=_fake(1))
    nccl = SimpleNamespace(streams={(0, 1, 2): _fake(2), (1, 2): _fake(3)})
    assert transport_streams(local) == {"comm": local.stream}
    assert list(transport_streams(nccl)) == ["comm[0, 1, 2]", "comm[1, 2]"]


@pytest.mark.gpu
def test_three_rank_local_run_with_baselines_keeps_streams_distinct():
    """Every variant's runtime builds (check_distinct runs in RankRuntime) and the process holds
    no two roles on one stream: fresh streams per runtime would wrap torch's 32-stream pool."""
    from pyengine.core.spec import load_spec
    from pyengine.execute.launch import Backend, bind, run_ranks
    from pyengine.execute.measure import RunOptions, measure_rank
    from pyengine.transport import streams

    small = {"seq_len": 256, "hidden_size": 512, "ffn_hidden_size": 1024, "vocab_size": 1000}
    spec = load_spec().replace(model=small, comm={"timeout_s": 60})
    groups = spec.comm_groups()
    for _ in range(2):  # a second run reuses the same streams instead of making more
        run_ranks(bind(measure_rank, spec, RunOptions(iters=1, warmup=1, baselines=True)),
                  spec.world_size, backend=Backend.LOCAL, groups=groups, timeout_s=60,
                  job_timeout_s=600)
    made = {key: s for key, s in streams._streams.items() if key[1] < spec.world_size}
    assert len(made) <= 3 * spec.world_size  # compute, side, comm per rank: no growth per variant
    check_distinct(-1, {f"{rank}/{role}": s for (_, rank, role), s in made.items()})
    assert isinstance(next(iter(made.values())), torch.cuda.Stream)
