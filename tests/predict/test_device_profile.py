"""The device time model, its sources, the profile file format, and the expected-experts count."""

import itertools
import json
import statistics

import pytest

from pyengine.core.spec import load_spec
from pyengine.model.costs import KernelCost, KernelKind
from pyengine.model.routing import MeasuredRouting, Routing
from pyengine.model.stages import StageKind, stages_of
from pyengine.predict.devices import PRESETS, DeviceProfileError, SourceKind, load_profile, profile_from_dict
from pyengine.predict.device_profile import number_fields
from pyengine.predict.planner import plan

H100 = PRESETS["h100"]


# ---- experts touched -----------------------------------------------------------------------------
@pytest.mark.parametrize("t", [1, 2, 3])
def test_uniform_experts_touched_against_enumeration(t):
    """Every token picks a uniformly random 2-subset of 8 experts: average the distinct experts
    over all C(8,2)^t choices."""
    subsets = list(itertools.combinations(range(8), 2))
    distinct = [len(set().union(*choice)) for choice in itertools.product(subsets, repeat=t)]
    assert Routing(8, 2).experts_touched(range(8), t) == pytest.approx(statistics.fmean(distinct), rel=1e-12)
    # a GPU holding experts {0, 1, 2}: the mean count of them among the chosen
    held = [len(set().union(*choice) & {0, 1, 2}) for choice in itertools.product(subsets, repeat=t)]
    assert Routing(8, 2).experts_touched([0, 1, 2], t) == pytest.approx(statistics.fmean(held), rel=1e-12)


def test_measured_experts_touched_against_enumeration():
    """A batch of 4 tokens: 2 chose {0,1}, 1 chose {0,2}, 1 chose {2,3}; t tokens drawn from it
    independently (all 4^t sequences equally likely)."""
    batch = [(0, 1), (0, 1), (0, 2), (2, 3)]
    r = MeasuredRouting(4, 2, (((0, 1), 2), ((0, 2), 1), ((2, 3), 1)), 4)
    for t in (1, 2, 3):
        for held in ([0], [1, 3], [0, 1, 2, 3]):
            want = statistics.fmean(len(set().union(*seq) & set(held)) for seq in itertools.product(batch, repeat=t))
            assert r.experts_touched(held, t) == pytest.approx(want, rel=1e-12), (t, held)


def test_stages_price_the_expected_experts():
    """t=2 tokens, top-2 of 8: 8 (1 - 0.75^2) = 3.5 experts touched (min(E, t k) would say 4)."""
    seed = load_spec(None)
    gate_up, down = stages_of(seed)[StageKind.EXPERTS].kernels(2, 1)
    assert gate_up.kind is down.kind is KernelKind.GROUPED and gate_up.rows == pytest.approx(4 / 3.5)
    assert gate_up.hbm_bytes == pytest.approx(2 * 3.5 * 4096 * 7168 * 2 + 4 * 4096 * 2 + 4 * 7168 * 2)
    ep = load_spec(None).replace(parallel={"stages": [
        {"name": "embed", "gpus": [0]},
        {"name": "experts", "gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1], [2, 3, 4], [5, 6, 7]]},
        {"name": "output", "gpus": [0]}]})
    kernels = stages_of(ep)[StageKind.EXPERTS].kernels(2, 1)  # GPU 1 holds 3 experts
    touched = 3 * (1 - 0.75 ** 2)
    pairs = 2 * 2 * 3 / 8
    # an expert GPU received its rows: no gather; the router's GPU gathers its tokens' rows from u
    assert [k.kind for k in kernels] == [KernelKind.GROUPED, KernelKind.GROUPED, KernelKind.MEMORY]
    assert kernels[0].hbm_bytes == pytest.approx(2 * touched * 4096 * 14336 * 2 + pairs * 4096 * 2 + pairs * 14336 * 2)
    assert kernels[0].rows == pytest.approx(pairs / touched)
    on_router = stages_of(ep)[StageKind.EXPERTS].kernels(2, 0)
    assert [k.name for k in on_router][:2] == ["gather_rows", "gate_up_swiglu"]


# ---- the time model ------------------------------------------------------------------------------
def test_kernel_time_by_kind():
    d = H100.with_values(gemm_half_rows=100.0)
    peak, hbm, launch = 989e12, 3350e9 * d.hbm_efficiency, d.kernel_launch_us * 1e-6
    # a three-field kernel: the plain roofline at the dense plateau, whatever its rows
    assert d.kernel_s(KernelCost("k", 1e12, 1e6), "bfloat16") == pytest.approx(launch + 1e12 / (peak * d.gemm_efficiency))
    # a dense GEMM of M rows: plateau x M / (M + 100)
    g = KernelCost.gemm("g", 300, 8192, 8192, 2)
    assert (g.flops, g.hbm_bytes) == (2 * 300 * 8192 * 8192, (300 * 8192 + 8192 * 8192 + 300 * 8192) * 2)
    compute = g.flops / (peak * d.gemm_efficiency * 300 / 400)
    assert d.kernel_s(g, "bfloat16") == pytest.approx(launch + max(compute, g.hbm_bytes / hbm))
    # a grouped GEMM at 64 rows per expert: 0.8033 x 64 / (64 + 225.5)
    k = KernelCost.grouped("e", 6e10, 1e8, 64)
    assert d.kernel_s(k, "bfloat16") == pytest.approx(launch + 6e10 / (peak * 794.5 / 989 * 64 / 289.5), rel=1e-4)
    # memory-bound: its FLOPs do not count
    assert d.kernel_s(KernelCost("n", 1e15, 1e9, KernelKind.MEMORY), "bfloat16") == pytest.approx(launch + 1e9 / hbm)


def test_transfer_and_collective_latency():
    assert H100.transfer_s(0, "nvlink") == pytest.approx(3.7e-6)
    from pyengine.core.collectives import Collective

    h = H100.with_values(collective_step_us=0.5)
    # 4 GPUs all-reduce: 3.5 us + 6 steps x 0.5 us + 2 (3/4) x 1 MB / (450 GB/s x 367.5/450)
    assert h.collective_s(Collective.ALL_REDUCE, 1e6, 4, "nvlink") == pytest.approx(6.5e-6 + 1.5e6 / 367.5e9)


# ---- sources -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_number_has_a_source(name):
    p = PRESETS[name]
    assert set(p.sources) == set(number_fields())
    assert all(s.ref.strip() for s in p.sources.values())


def test_plan_prints_and_returns_the_sources(capsys):
    from pyengine.report.plan_view import print_plan
    from pyengine.report.tables import console

    p = plan(load_spec(None), "h100")
    data = p.to_dict()["device"]["sources"]
    assert data["hbm_efficiency"]["kind"] == "fit" and "#24700" in data["hbm_efficiency"]["ref"]
    assert data["link_efficiency"] == {"kind": "published", "ref": H100.source("link_efficiency").ref}
    print_plan(p, out=console())
    text = capsys.readouterr().out
    assert "profile sources" in text and "NVIDIA/nccl issue #1455" in text


# ---- the file format -----------------------------------------------------------------------------
MEASURED = {"base": "h100", "hbm_efficiency": 0.9, "kernel_launch_us": 3.1,
            "sources": {"hbm_efficiency": {"kind": "measured", "ref": "pyengine calibrate: HBM copy"},
                        "kernel_launch_us": {"kind": "measured", "ref": "pyengine calibrate: launch"}},
            "provenance": {"machine": "NVIDIA H100 80GB HBM3", "date": "2026-11-26", "commit": "abc1234",
                           "command": "pyengine calibrate --out p.json"}}


def test_a_measured_profile_replaces_the_preset_field_by_field(tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(json.dumps(MEASURED))
    p = load_profile(path)
    for f in number_fields():
        if f in ("hbm_efficiency", "kernel_launch_us"):
            assert getattr(p, f) == MEASURED[f] and p.source(f).kind is SourceKind.MEASURED, f
        else:
            assert getattr(p, f) == getattr(H100, f) and p.source(f) == H100.source(f), f
    assert p.provenance == MEASURED["provenance"] and p.name == "measured (from h100)"
    again = profile_from_dict(p.to_dict())  # a profile's dict loads back unchanged
    assert again == p and again.sources == p.sources and again.provenance == p.provenance


def test_numbers_without_a_source_are_the_files_and_the_legacy_efficiency(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"base": "seed32g", "bandwidth_efficiency": 0.75, "link_efficiency": 0.7}))
    p = load_profile(path)
    assert (p.hbm_efficiency, p.link_efficiency) == (0.75, 0.7)
    assert p.source("hbm_efficiency").kind is SourceKind.FILE and str(path) in p.source("hbm_efficiency").ref


@pytest.mark.parametrize("data,field", [
    ({"base": "h100", "sources": {"hbm_efficiency": {"kind": "measured", "ref": "x"}}}, "device.sources.hbm_efficiency"),
    ({"base": "h100", "hbm_efficiency": 0.9, "sources": {"hbm_efficiency": {"kind": "guess", "ref": "x"}}},
     "device.sources.hbm_efficiency.kind"),
    ({"base": "h100", "hbm_efficiency": 0.9, "sources": {"hbm_efficiency": {"kind": "fit", "ref": ""}}},
     "device.sources.hbm_efficiency.ref"),
    ({"base": "h100", "hbm_efficiency": 0.9, "sources": {"hbm_efficiency": "measured"}}, "device.sources.hbm_efficiency"),
    ({"base": "h100", "provenance": {"date": 5}}, "device.provenance"),
    ({"base": "h100", "grouped_gemm_half_rows": -1}, "device.grouped_gemm_half_rows"),
    ({"base": "h100", "link_efficiency": 0}, "device.link_efficiency"),
])
def test_bad_sources_and_numbers_name_the_field(tmp_path, data, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DeviceProfileError) as e:
        load_profile(path)
    assert e.value.field == field
