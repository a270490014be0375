"""Host time of a decode step (pyengine.predict.host): the formula per rank, by hand, from the rank's
own action table; the verdict flips where host time passes device time; graphs replace the launches."""

import pytest

from helpers import TINY_CONFIG
from pyengine.core.spec import load_spec
from pyengine.model.batch import Batch
from pyengine.predict.host import LAUNCHES, decode_host
from pyengine.predict.presets import H100
from pyengine.schedule import Kind, build
from pyengine.model.stages import StageKind

SPEC = load_spec(TINY_CONFIG).replace(model={"num_layers": 2, "num_attention_heads": 4,
                                             "num_key_value_heads": 2, "head_dim": 8, "batch_size": 4},
                                      schedule={"micro_batches": 2})


def test_eager_and_graphed_host_time_per_rank_by_hand():
    dev = H100.with_values(action_host_us=10.0, host_launch_us=1.0, graph_replay_us=2.0)
    h = decode_host(SPEC, dev, position=30)
    table = build(SPEC, batch=Batch.decode([30] * 4, 2))
    for rank in (0, 1, 2):
        acts = table[rank]
        computes = [a for a in acts if a.kind is Kind.COMPUTE]
        x = h.ranks[rank]
        assert (x.actions, x.computes) == (len(acts), len(computes))
        if rank in (1, 2):  # TP experts: 2 layers x 2 groups, 4 launches each
            assert x.kernels == 2 * 2 * LAUNCHES[(StageKind.EXPERTS, "tensor")] == 16
        else:  # per group: layer 0 (13), layer 1 (12), the head (2)
            assert x.kernels == 2 * (13 + 12 + 2)
        assert x.eager_s == pytest.approx((len(acts) * 10 + x.kernels * 1) * 1e-6)
        assert x.graphed_s == pytest.approx(((len(acts) - len(computes)) * 10 + len(computes) * 12) * 1e-6)


def test_the_verdict_follows_host_against_device_time():
    fast_host = decode_host(SPEC, H100.with_values(action_host_us=0.0, host_launch_us=0.0, graph_replay_us=0.0), 30)
    slow_host = decode_host(SPEC, H100.with_values(action_host_us=1e4), 30)
    assert all(x.bound(False) == "device-bound" for x in fast_host.ranks.values())
    assert fast_host.step_s(False) == fast_host.device_step_s
    assert all(x.bound(True) == "host-bound" for x in slow_host.ranks.values())
    assert slow_host.step_s(False) == max(x.eager_s for x in slow_host.ranks.values()) > slow_host.device_step_s
