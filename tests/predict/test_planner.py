"""Planner: per-GPU figures, honest verdicts, memory fit, balancing, search; device profiles."""

import json

import pytest

from helpers import TINY_CONFIG
from pyengine.core.collectives import Collective
from pyengine.core.spec import DeploymentSpec, SpecError, load_spec
from pyengine.predict import balance, planner, prediction
from pyengine.predict import search as plan_search
from pyengine.predict.devices import PRESETS, DeviceProfileError, load_profile

SEED = load_spec(None)
TINY = load_spec(TINY_CONFIG)
T, H, F, E, V, ES = 1024, 4096, 14336, 8, 32000, 2


@pytest.fixture(scope="module")
def seed_plan():
    return planner.plan(SEED)


def _verdict(p, claim_start):
    return next(v for v in p.verdicts if v.claim.startswith(claim_start))


def test_default_device_is_seed32g(seed_plan):
    assert seed_plan.device.name == "seed32g"


def test_seed_per_gpu_figures(seed_plan):
    g0, g1, g2 = seed_plan.gpus
    assert g0.flops == pytest.approx(268.5e9, rel=1e-3)
    assert g1.flops == g2.flops == pytest.approx(360.8e9, rel=1e-3)
    assert g0.weight_bytes == (2 * V * H + 2 * H + H * E) * ES  # embed, out, two norms, router
    assert g1.weight_bytes == g2.weight_bytes == 3 * E * H * (F // 2) * ES
    assert g0.parts == ["embed+router", "output head"] and len(g1.parts) == len(g2.parts) == 1
    assert all(g.fits for g in seed_plan.gpus)
    # traffic is conserved: what is sent is received
    assert sum(g.sent_bytes for g in seed_plan.gpus) == sum(g.recv_bytes for g in seed_plan.gpus)
    # GPU 0 sends u + routing to both shards for every micro-batch
    assert g0.sent_per_peer[1] == g0.sent_per_peer[2] == 256 * (H * ES + 2 * 8)
    # activations: at least the logits of the whole batch sit on the output GPU
    assert g0.activation_bytes >= T * V * ES
    assert sum(g.flop_share for g in seed_plan.gpus) == pytest.approx(1.0)
    lb = seed_plan.load_balance
    assert lb["max_diff_pct"] == pytest.approx(9.32, abs=0.01)


def test_seed_stages(seed_plan):
    st = seed_plan.stages
    assert [s.name for s in st] == ["embed", "experts", "output"]
    assert sum(s.flops for s in st) == pytest.approx(sum(g.flops for g in seed_plan.gpus))
    assert sum(s.weight_bytes for s in st) == sum(g.weight_bytes for g in seed_plan.gpus)


def test_predicted_matches_simulated_timeline(seed_plan):
    pr = seed_plan.predicted
    assert pr.latency_s == seed_plan.timeline.makespan_s
    assert pr.bubble_fraction == pytest.approx(seed_plan.timeline.bubble_fraction)
    bottleneck = max(g.busy_s for g in seed_plan.gpus)
    assert pr.throughput_tokens_per_s == pytest.approx(T / max(bottleneck, max(g.comm_s for g in seed_plan.gpus)))
    assert 0 < pr.utilization < 1 and 0 < pr.steady_state_utilization <= 1


def test_honest_verdicts(seed_plan):
    lb = _verdict(seed_plan, "load balance")
    assert lb.holds is False
    assert "27.1/36.4/36.4%" in lb.text and "does not hold" in lb.text
    assert "268.5 GFLOP" in lb.text and "360.8 GFLOP" in lb.text
    mod = _verdict(seed_plan, "module division")
    assert mod.holds is False and "4 parts" in mod.text and "2/1/1 per GPU" in mod.text
    assert _verdict(seed_plan, "memory 33/33/34").holds is False
    for claim in ("latency cut 40%", "throughput +60%", "95% GPU utilisation"):
        v = _verdict(seed_plan, claim)
        assert v.holds is not True, v.text  # the seed's m=4 plan does not reach its own figures
        assert "does not hold" in v.text or "holds only" in v.text
        assert "seed32g" in v.text or "%" in v.text
    names = {b.name for b in seed_plan.baselines}
    assert names == {"single_gpu", "pipeline_m1_no_overlap"}
    for v in seed_plan.verdicts:
        assert v.text.rstrip().endswith(".")


def test_memory_overflow_verdict():
    small = SEED.replace(hardware={"gpu_memory_gb": 2})
    p = planner.plan(small)
    assert not p.fits
    assert [g.index for g in p.gpus if not g.fits] == [1, 2]
    v = _verdict(p, "fits in 2 GB")
    assert v.holds is False and "does not fit" in v.text and "GPU 1" in v.text
    single = next(b for b in p.baselines if b.name == "single_gpu")
    assert not single.fits and "does not fit" in single.note


def test_single_gpu_baseline_is_sequential(seed_plan):
    single = next(b for b in seed_plan.baselines if b.name == "single_gpu")
    # one GPU, no comm: latency = sum of the op times of the whole batch
    sg = prediction.single_gpu_spec(SEED)
    assert single.latency_s == pytest.approx(sum(prediction.predict_busy(sg, seed_plan.device).values()))
    assert single.fits


def test_second_config_tiny():
    p = planner.plan(TINY)
    assert [g.index for g in p.gpus] == [0, 1, 2]
    assert p.gpus[1].flops == 6 * 48 * 2 * 48 * 16 and p.gpus[2].flops == 6 * 48 * 2 * 48 * 24
    assert p.gpus[1].parts == ["experts F[0:16]"]
    assert p.predicted.latency_s > 0 and p.fits


def test_h100_is_faster_than_seed32g():
    a = planner.plan(SEED, "seed32g").predicted
    b = planner.plan(SEED, "h100").predicted
    assert b.latency_s < a.latency_s


def test_balanced_fractions_equalise_busy():
    dev = load_profile("seed32g")
    fr = balance.balanced_fractions(SEED, dev)
    assert fr is not None and set(fr) == {0, 1, 2} and sum(fr.values()) == pytest.approx(1.0)
    assert fr[0] < fr[1]  # GPU 0 also runs the output head, so it takes a smaller slice
    spec = balance.with_experts(SEED, [0, 1, 2], fr)
    busy = prediction.predict_busy(spec, dev)
    assert max(busy.values()) / min(busy.values()) < 1.02


@pytest.fixture(scope="module")
def small_search():
    return plan_search.search(SEED, micro_batches=(1, 2, 4), kinds=("gpipe",))


def test_search_candidates_valid_and_ranked(small_search):
    cands = small_search
    assert len(cands) > 20
    for c in cands:
        assert DeploymentSpec.from_json(c.spec.to_json()) == c.spec  # passes validation
        assert c.why
    lat = [c.latency_s for c in cands if c.fits]
    assert lat == sorted(lat)
    assert [c.rank_latency for c in cands] == list(range(1, len(cands) + 1))
    by_thr = sorted(cands, key=lambda c: c.rank_throughput)
    thr = [c.throughput_tokens_per_s for c in by_thr if c.fits]
    assert thr == sorted(thr, reverse=True)
    seed = [c for c in cands if c.is_seed]
    assert len(seed) == 1 and seed[0].spec == SEED
    assert cands[0].latency_s <= seed[0].latency_s
    assert any(c.pareto for c in cands)
    # terms decompose latency exactly
    for c in cands[:5]:
        assert sum(c.terms.values()) == pytest.approx(c.latency_s)
    assert "vs your config" in cands[0].why and "shrinks" in cands[0].why


def test_search_covers_the_space(small_search):
    specs = [c.spec for c in small_search]
    assert {s.schedule.micro_batches for s in specs} == {1, 2, 4}
    assert {s.comm.boundary for s in specs} == {"all_reduce", "reduce_scatter", "partials"}
    assert any(0 in s.stage("experts").gpus for s in specs)  # GPU 0 takes an expert slice
    assert {s.stage("output").gpus[0] for s in specs} == {0, 1, 2}
    assert any(s.stage("experts").shard_fractions is not None and s.stage("experts").gpus == (1, 2)
               for s in specs)  # uneven TP on [1, 2]


def test_search_rank_by_throughput():
    cands = plan_search.search(TINY, micro_batches=(1, 3), rank_by="throughput")
    assert [c.rank_throughput for c in cands] == list(range(1, len(cands) + 1))
    with pytest.raises(ValueError):
        plan_search.search(TINY, micro_batches=(1,), rank_by="cost")


# ---- device profiles ----------------------------------------------------------------------------
def test_presets():
    h100, h200, s = (PRESETS[n] for n in ("h100", "h200", "seed32g"))
    assert h100.peak_tflops_bf16 == h200.peak_tflops_bf16 == 989
    assert (h100.hbm_gb_s, h100.memory_gb, h100.nvlink_gb_s) == (3350, 80, 450)
    assert (h200.hbm_gb_s, h200.memory_gb) == (4800, 141)
    assert (s.peak_tflops_fp16, s.hbm_gb_s, s.memory_gb, s.nvlink_gb_s) == (125, 900, 32, 150)
    ar, rs = Collective.ALL_REDUCE, Collective.REDUCE_SCATTER
    # collective: 3.5 us fixed + 0 us per ring step + bus bytes over 150 GB/s x 367.5/450 (h100's fits)
    assert s.collective_s(ar, 1e6, 2, "nvlink") == pytest.approx(3.5e-6 + 1e6 / (150e9 * 367.5 / 450))
    assert s.collective_s(rs, 1e6, 3, "nvlink") == pytest.approx(3.5e-6 + 2 / 3 * 1e6 / (150e9 * 367.5 / 450))
    assert s.collective_s(ar, 1e6, 1, "nvlink") == 0.0


def test_profile_from_json_overrides(tmp_path):
    path = tmp_path / "measured.json"
    path.write_text(json.dumps({"base": "h100", "hbm_gb_s": 3000, "gemm_efficiency": 0.6}))
    p = load_profile(path)
    assert p.hbm_gb_s == 3000 and p.gemm_efficiency == 0.6 and p.peak_tflops_bf16 == 989
    full = PRESETS["seed32g"].to_dict()
    path.write_text(json.dumps(full))
    assert load_profile(path).hbm_gb_s == 900


@pytest.mark.parametrize("data,field", [
    ({"base": "h100", "hbm_gb_s": "fast"}, "device.hbm_gb_s"),
    ({"base": "h100", "hbm_gb_s": -1}, "device.hbm_gb_s"),
    ({"base": "h100", "gemm_efficiency": 1.5}, "device.gemm_efficiency"),
    ({"base": "h100", "hbm_gbps": 1}, "device.hbm_gbps"),
    ({"base": "a100"}, "device.base"),
    ({"name": "x", "peak_tflops_bf16": 1}, "device.peak_tflops_fp16"),  # missing fields
])
def test_bad_profile_names_field(tmp_path, data, field):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(DeviceProfileError) as e:
        load_profile(path)
    assert e.value.field == field
    assert isinstance(e.value, SpecError)  # the CLI turns it into exit 2


def test_bad_profile_name_or_json(tmp_path):
    with pytest.raises(DeviceProfileError, match="neither a preset"):
        load_profile("b200")
    path = tmp_path / "bad.json"
    path.write_text("{\n  \"base\": \"h100\",,\n}")
    with pytest.raises(DeviceProfileError, match="line 2, column"):
        load_profile(path)


def test_search_ranks_every_fitting_candidate_above_every_one_that_does_not():
    from pyengine.predict.resources import memory_bytes

    dev = plan_search.load_profile(None)
    roomy = plan_search.search(TINY, micro_batches=(1, 3))
    needs = sorted(max(memory_bytes(c.spec, dev).values()) for c in roomy)
    tight = TINY.replace(hardware={"gpu_memory_gb": needs[len(needs) // 2] / 1e9})  # about half fit
    for rank_by in ("latency", "throughput"):
        cands = plan_search.search(tight, micro_batches=(1, 3), rank_by=rank_by)
        fit = [c for c in cands if c.fits]
        assert 0 < len(fit) < len(cands)
        for key in ("rank_latency", "rank_throughput"):
            worst_fit = max(getattr(c, key) for c in fit)
            assert all(getattr(c, key) > worst_fit for c in cands if not c.fits), key
