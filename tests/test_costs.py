"""Exact FLOP and byte counts (a multiply-add is 2 FLOPs)."""

from importlib import resources

import pytest

from pyengine import costs
from pyengine.spec import DeploymentSpec, load_spec


def _tiny() -> DeploymentSpec:
    return DeploymentSpec.from_json(resources.files("pyengine").joinpath("configs/tiny_cpu.json").read_text())


def test_seed_flops_per_gpu():
    spec = load_spec(None)
    T, H, F, E, k, V = 1024, 4096, 14336, 8, 2, 32000
    f = costs.rank_flops(spec)
    assert f[0] == 2 * T * H * E + 2 * T * H * V  # router + output head
    assert f[1] == f[2] == 6 * T * k * H * (F // 2)  # gate + up + down on half of F
    assert f[0] == pytest.approx(268.5e9, rel=1e-3)
    assert f[1] == pytest.approx(360.8e9, rel=1e-3)


@pytest.mark.parametrize("spec", [load_spec(None), _tiny()], ids=["seed", "tiny"])
def test_stage_costs_sum_to_model_total(spec):
    T, m = spec.model.tokens, spec.model
    total = sum(costs.rank_flops(spec).values())
    stages = (costs.stage0_flops(spec, T)
              + sum(costs.expert_flops(spec, T, c) for c in costs.shard_cols(spec).values())
              + costs.stage2_flops(spec, T))
    assert total == stages
    # the shards together do exactly the unsharded expert FFN's work
    assert sum(costs.expert_flops(spec, T, c) for c in costs.shard_cols(spec).values()) == \
        costs.expert_flops(spec, T, m.ffn_hidden_size)
    # micro-batching does not change the work
    per_mb = [costs.rank_flops(spec, t) for t in spec.micro_batch_sizes()]
    assert {r: sum(d[r] for d in per_mb) for r in spec.ranks} == costs.rank_flops(spec)


def test_tiny_config_exact():
    spec = _tiny()  # T=48, H=48, F=40 split 0.4/0.6, E=5, k=2, V=101
    assert costs.shard_cols(spec) == {1: 16, 2: 24}
    f = costs.rank_flops(spec)
    assert f[0] == 2 * 48 * 48 * 5 + 2 * 48 * 48 * 101
    assert f[1] == 6 * 48 * 2 * 48 * 16
    assert f[2] == 6 * 48 * 2 * 48 * 24


def test_payload_bytes():
    spec = load_spec(None)
    t = 256
    assert costs.payload_bytes(spec, "act", t) == t * (4096 * 2 + 2 * (4 + 4))
    assert costs.payload_bytes(spec, "sum", t) == costs.payload_bytes(spec, "partial", t) == t * 4096 * 2
    halves = [costs.payload_bytes(spec, "half", 255, part) for part in range(2)]
    assert sum(halves) == costs.payload_bytes(spec, "sum", 255)  # odd token count: 128 + 127
    with pytest.raises(ValueError):
        costs.payload_bytes(spec, "bogus", t)
