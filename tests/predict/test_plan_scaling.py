"""A plan of a deep model does work in proportion to its layers, and builds and checks each
distinct schedule table once. Counts, never timings: the schedule builder's questions to the
stages grow linearly with the layers (a scan of every consumer per compute made them grow with
the square: 100 layers took 7 s, 1,000 more than 280 s), and a plan builds as many tables at
1,000 layers as at 4."""

import importlib

import pytest

from helpers import small_spec
from pyengine.model.stages.base import Stage
from pyengine.predict import planner
from pyengine.predict.devices import load_profile

build_module = importlib.import_module("pyengine.schedule.build")


def _layered(layers: int):
    return small_spec(model={"num_layers": layers, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "batch_size": 1, "seq_len": 16})


@pytest.fixture
def counted(monkeypatch):
    """Calls of every stage's inputs() and of the builder's witness (one full table build)."""
    calls = {"inputs": 0, "builds": 0}
    stage_classes = {type(st) for st in __import__("pyengine.model.stages", fromlist=["stages_of"])
                     .stages_of(_layered(2))} | {Stage}
    for cls in stage_classes:
        if "inputs" in vars(cls):
            def inputs(self, layer, _orig=vars(cls)["inputs"]):
                calls["inputs"] += 1
                return _orig(self, layer)
            monkeypatch.setattr(cls, "inputs", inputs)
    witness = build_module._Flow.witness

    def counted_witness(self, kind):
        calls["builds"] += 1
        return witness(self, kind)

    monkeypatch.setattr(build_module._Flow, "witness", counted_witness)
    build_module._built.cache_clear()
    yield calls
    build_module._built.cache_clear()


def test_a_build_asks_the_stages_in_proportion_to_the_layers(counted):
    per = {}
    for layers in (16, 32):
        counted["inputs"] = 0
        build_module.build(_layered(layers))
        per[layers] = counted["inputs"]
    assert per[32] <= 2.1 * per[16], per  # quadratic would be 4x


def test_the_same_table_is_built_and_checked_once(counted):
    spec = _layered(3)
    for _ in range(3):
        build_module.build(spec)
    assert counted["builds"] == 1
    a, b = build_module.build(spec), build_module.build(spec)
    a[0].clear()  # each caller gets its own lists
    assert b[0]


@pytest.mark.slow  # ~30 s on a 2-core CPU: the plan still prices every action of 1,000 layers
def test_a_plan_of_1000_layers_builds_as_many_tables_as_one_of_4(counted):
    builds = {}
    for layers in (4, 1000):
        counted["builds"] = 0
        planner.plan(_layered(layers), load_profile(None), new_tokens=8)
        builds[layers] = counted["builds"]
    assert builds[1000] == builds[4] <= 24, builds
