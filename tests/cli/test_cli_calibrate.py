"""`pyengine calibrate`: bad input and a missing GPU are one line and exit 2 before anything is
timed; on a (faked) H100 the measurements become a profile file that `plan --device FILE` reads,
its measured numbers replacing the preset's."""

import json

import pytest
import torch

from pyengine.cli.main import main
from pyengine.execute import calibrate as measure
from pyengine.execute import calibrate_host
from pyengine.execute.backends import Backend
from pyengine.model.costs import KernelCost
from pyengine.model.stages import StageKind, stages_of
from pyengine.predict.devices import PRESETS, SourceKind, load_profile


@pytest.mark.parametrize("argv,needle", [
    (["--out", "p.txt"], "--out = 'p.txt': unsupported extension"),
    (["--base", "a100"], "--base = 'a100': must be one of"),
    (["--config", "pyengine/configs/seed_ep_3gpu.json"], "tensor-parallel"),
])
def test_bad_flags_exit_2_in_one_line(argv, needle, capsys, monkeypatch):
    monkeypatch.setattr(measure, "measure_compute", lambda *a, **k: pytest.fail("measured"))
    assert main(["calibrate", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_without_a_gpu_exits_2_in_one_line(capsys, tmp_path):
    assert main(["calibrate", "--out", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert "needs a CUDA GPU" in err and err.count("\n") == 1
    assert not (tmp_path / "p.json").exists()


def _fake_measurements(spec, device, sizes=None):
    """What an H100 with HBM efficiency 0.9, launch 3 us, dense plateau 0.75 at no row
    dependence and grouped 0.6 x m / (m + 120) would measure, times written out by hand."""
    peak, hbm = 989e12, 3350e9 * 0.9
    dense = []
    for m in (512, 1024, 2048, 4096, 8192):
        k = KernelCost.gemm("g", m, 8192, 8192, 2)
        dense.append(((k,), 3e-6 + max(k.flops / (peak * 0.75), k.hbm_bytes / hbm)))
    stage = stages_of(spec)[StageKind.EXPERTS]
    grouped = []
    for t in (64, 256, 512, 1024, 2048, 4096):
        ks = tuple(stage.kernels(t, 1))
        grouped.append((ks, sum(3e-6 + max(k.flops / (peak * 0.6 * k.rows / (k.rows + 120)), k.hbm_bytes / hbm)
                                for k in ks)))
    return measure.ComputeMeasurements(gpu="NVIDIA H100 80GB HBM3", dtype="bfloat16",
                                       copy=[(2 * 2 ** 30, 2 * 2 ** 30 / hbm + 3e-6)], launch_s=3e-6,
                                       dense=dense, grouped=grouped)


def test_a_faked_h100_gives_a_profile_plan_reads(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(measure, "measure_compute", _fake_measurements)
    monkeypatch.setattr(calibrate_host, "measure_host", lambda *a: calibrate_host.HostMeasurements(6e-6, 4e-6, 3e-5))
    out = tmp_path / "h100.json"
    assert main(["calibrate", "--out", str(out)]) == 0
    capsys.readouterr()
    p = load_profile(out)
    h100 = PRESETS["h100"]
    assert p.hbm_efficiency == pytest.approx(0.9, rel=1e-6) and p.kernel_launch_us == pytest.approx(3.0)
    assert p.gemm_efficiency == pytest.approx(0.75, rel=1e-3) and p.gemm_half_rows == pytest.approx(0, abs=1.0)
    assert p.grouped_gemm_efficiency == pytest.approx(0.6, rel=1e-2)
    assert p.grouped_gemm_half_rows == pytest.approx(120, rel=2e-2)
    assert (p.host_launch_us, p.graph_replay_us, p.action_host_us) == pytest.approx((6.0, 4.0, 30.0))
    measured = {"hbm_efficiency", "kernel_launch_us", "gemm_efficiency", "gemm_half_rows",
                "grouped_gemm_efficiency", "grouped_gemm_half_rows", "host_launch_us", "graph_replay_us",
                "action_host_us"}
    for f in h100.sources:  # one GPU: the link numbers stay the preset's published ones
        if f in measured:
            assert p.source(f).kind is SourceKind.MEASURED, f
        else:
            assert getattr(p, f) == getattr(h100, f) and p.source(f) == h100.source(f), f
    data = json.loads(out.read_text())
    assert {"machine", "date", "commit", "command"} <= set(data["provenance"])
    assert data["provenance"]["links"].startswith("published")
    assert main(["plan", "--device", str(out)]) == 0
    text = capsys.readouterr().out
    assert "h100-measured" in text and "measured: pyengine calibrate" in text


def test_the_link_sweep_runs_on_the_comm_harness():
    """The sweep calibrate runs on NCCL, here on 2 gloo processes: (bytes, seconds) per size."""
    from pyengine.cli.calibrate import _link

    for op in ("sendrecv", "all_reduce"):
        got = _link(op, 2, backend=Backend.GLOO, sizes=(8, 4096))
        assert [b for b, _ in got] == [8, 4096] and all(s > 0 for _, s in got)


@pytest.mark.parametrize("gpus,bus_factor", [(2, 1.0), (3, 4 / 3)])  # 2(n-1)/n: 1 hides algbw vs busbw
def test_faked_gpus_measure_the_links(capsys, tmp_path, monkeypatch, gpus, bus_factor):
    """send/recv 2 us + bytes / 300 GB/s; all-reduce over n GPUs 5 us + bus bytes / 360 GB/s,
    so the fit must turn message bytes into bus bytes (x 4/3 over 3 GPUs) to find 360 GB/s."""
    import pyengine.cli.calibrate as cal

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(measure, "measure_compute", _fake_measurements)
    monkeypatch.setattr(calibrate_host, "measure_host", lambda *a: calibrate_host.HostMeasurements(6e-6, 4e-6, 3e-5))
    sizes = (1e3, 1e6, 1e8)
    fake = {"sendrecv": [(b, 2e-6 + b / 300e9) for b in sizes],
            "all_reduce": [(b, 5e-6 + bus_factor * b / 360e9) for b in sizes]}
    monkeypatch.setattr(cal, "_link", lambda op, n: fake[op])
    out = tmp_path / "p.json"
    assert main(["calibrate", "--out", str(out)]) == 0
    p = load_profile(out)
    assert p.nvlink_latency_us == pytest.approx(2.0, rel=1e-6)
    assert p.link_efficiency == pytest.approx(360 / 450, rel=1e-6)
    # 2(n-1) ring steps at h100's 0 us each, so the whole intercept is the fixed latency
    assert p.collective_base_us == pytest.approx(5.0, rel=1e-6)
    for f in ("nvlink_latency_us", "link_efficiency", "collective_base_us"):
        assert p.source(f).kind is SourceKind.MEASURED, f
    assert p.source("pcie_latency_us") == PRESETS["h100"].source("pcie_latency_us")
    assert json.loads(out.read_text())["provenance"]["links"] == "measured"
