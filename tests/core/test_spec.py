"""DeploymentSpec validation: every rule names the field path; JSON round trip; derived layout."""

import copy
import json

import pytest

from pyengine.core.spec import DeploymentSpec, SpecError, load_spec

SEED = load_spec(None).to_dict()


def _spec(mutate) -> DeploymentSpec:
    d = copy.deepcopy(SEED)
    mutate(d)
    return DeploymentSpec.from_dict(d)


def _set(path: str, value):
    """Mutator setting a dotted path (list indices as [i]) to value."""
    def mutate(d):
        keys = path.replace("[", ".").replace("]", "").split(".")
        node = d
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        last = keys[-1]
        if value is _DELETE:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
    return mutate


_DELETE = object()

CASES = [
    # (dotted path to set, value, field path expected in the error, words in the rule)
    ("model.hidden_sise", 8, "model.hidden_sise", "did you mean 'hidden_size'"),  # unknown key, suggestion
    ("hardware.gpus", 3, "hardware.gpus", "unknown key"),
    ("model.seq_len", "1024", "model.seq_len", "type int"),  # wrong type
    ("model.top_k", True, "model.top_k", "type int"),  # bool is not an int
    ("hardware.gpu_memory_gb", True, "hardware.gpu_memory_gb", "type float"),
    ("comm.overlap", 1, "comm.overlap", "type bool"),  # int is not a bool
    ("parallel.stages[1].tensor_parallel_size", 2.0, "parallel.stages[1].tensor_parallel_size", "type int"),
    ("model.hidden_size", 0, "model.hidden_size", "> 0"),  # non-positive sizes
    ("model.vocab_size", -5, "model.vocab_size", "> 0"),
    ("hardware.num_gpus", 0, "hardware.num_gpus", "> 0"),
    ("hardware.gpu_memory_gb", -1, "hardware.gpu_memory_gb", "> 0"),
    ("schedule.micro_batches", 0, "schedule.micro_batches", "> 0"),
    ("comm.timeout_s", 0, "comm.timeout_s", "> 0"),
    ("model.top_k", 9, "model.top_k", "num_experts"),  # top_k > E
    ("parallel.stages[1].tensor_parallel_size", 3, "parallel.stages[1].tensor_parallel_size", "number of GPUs"),
    ("parallel.stages[1].shard_fractions", [0.5, 0.6], "parallel.stages[1].shard_fractions", "sum to 1"),
    ("parallel.stages[1].shard_fractions", [1.0], "parallel.stages[1].shard_fractions", "one fraction per GPU"),
    ("parallel.stages[1].shard_fractions", [1.0, 0.0], "parallel.stages[1].shard_fractions", "> 0"),
    ("parallel.stages[1].shard_fractions", ["a", 1], "parallel.stages[1].shard_fractions", "list of numbers"),
    ("parallel.stages[0].shard_fractions", [1.0], "parallel.stages[0].shard_fractions", "only the 'experts'"),
    ("parallel.stages[1].gpus", [1, 3], "parallel.stages[1].gpus", "GPU 3 does not exist"),  # nonexistent GPU
    ("parallel.stages[1].gpus", [1, 1], "parallel.stages[1].gpus", "twice"),  # GPU twice in a TP group
    ("parallel.stages[1].gpus", [], "parallel.stages[1].gpus", "non-empty"),
    ("parallel.stages[1].gpus", [1, True], "parallel.stages[1].gpus", "ints"),
    ("parallel.stages", {"name": "embed"}, "parallel.stages", "list"),
    ("schedule.micro_batches", 1025, "schedule.micro_batches", "token count"),  # more micro-batches than tokens
    ("model.dtype", "fp8", "model.dtype", "must be one of"),  # unknown enums
    ("comm.boundary", "all_gather", "comm.boundary", "must be one of"),
    ("schedule.kind", "1f1b", "schedule.kind", "must be one of"),
    ("hardware.interconnect", "ethernet", "hardware.interconnect", "must be one of"),
    ("model.vocab_size", _DELETE, "model.vocab_size", "is required"),
    ("model", [1, 2], "model", "JSON object"),
]


@pytest.mark.parametrize("path,value,field,rule", CASES, ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_rule_names_field(path, value, field, rule):
    with pytest.raises(SpecError) as e:
        _spec(_set(path, value))
    assert e.value.field == field
    assert str(e.value).startswith(field)
    assert rule in str(e.value)


def test_non_experts_stage_with_two_gpus():
    def mutate(d):
        d["parallel"]["stages"][0] = {"name": "embed", "gpus": [0, 1], "tensor_parallel_size": 2}
    with pytest.raises(SpecError) as e:
        _spec(mutate)
    assert e.value.field == "parallel.stages[0].gpus"
    assert "one GPU" in str(e.value)


def test_wrong_stage_order_and_names():
    def swap(d):
        st = d["parallel"]["stages"]
        st[0], st[2] = st[2], st[0]
    with pytest.raises(SpecError) as e:
        _spec(swap)
    assert e.value.field == "parallel.stages" and "in this order" in str(e.value)
    with pytest.raises(SpecError) as e:
        _spec(_set("parallel.stages[1].name", "moe"))
    assert e.value.field == "parallel.stages"


def test_shard_with_no_columns():
    def mutate(d):
        d["model"]["ffn_hidden_size"] = 3
        d["parallel"]["stages"][1]["shard_fractions"] = [0.1, 0.9]  # round(0.1 * 3) = 0 columns
    with pytest.raises(SpecError) as e:
        _spec(mutate)
    assert e.value.field == "parallel.stages[1].shard_fractions" and "no column" in str(e.value)


def test_tp_wider_than_f():
    def mutate(d):
        d["model"]["ffn_hidden_size"] = 1
    with pytest.raises(SpecError) as e:
        _spec(mutate)
    assert e.value.field == "parallel.stages[1].tensor_parallel_size"


def test_malformed_json_reports_line_and_column():
    text = '{\n  "hardware": {"num_gpus": 3,,}\n}'
    with pytest.raises(SpecError) as e:
        DeploymentSpec.from_json(text, "bad.json")
    assert e.value.field == "bad.json"
    assert "line 2, column" in str(e.value)


def test_load_spec_missing_file(tmp_path):
    with pytest.raises(SpecError) as e:
        load_spec(tmp_path / "nope.json")
    assert e.value.field == "config" and "cannot be read" in str(e.value)


def test_replace_unknown_section():
    with pytest.raises(SpecError) as e:
        load_spec(None).replace(sched={"micro_batches": 2})
    assert e.value.field == "sched"


def test_json_round_trip(tmp_path):
    spec = load_spec(None)
    assert DeploymentSpec.from_json(spec.to_json()) == spec
    path = tmp_path / "seed.json"
    path.write_text(spec.to_json())
    assert load_spec(path) == spec
    assert json.loads(spec.to_json())["parallel"]["stages"][1]["gpus"] == [1, 2]


@pytest.mark.parametrize("tokens,m", [(1024, 4), (10, 4), (7, 7), (1025, 3), (5, 1)])
def test_near_even_micro_batches(tokens, m):
    spec = _spec(lambda d: d["model"].update(seq_len=tokens) or d["schedule"].update(micro_batches=m))
    sizes = spec.micro_batch_sizes()
    assert len(sizes) == m and sum(sizes) == tokens
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)  # first ones larger
    bounds = spec.micro_batch_bounds()
    assert bounds[0][0] == 0 and bounds[-1][1] == tokens
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))


@pytest.mark.parametrize("f,fractions,gpus", [
    (7, None, [0, 1, 2]),  # odd F, even split over 3
    (14337, [0.3, 0.7], [1, 2]),  # odd F, uneven
    (5, [0.2, 0.2, 0.6], [0, 1, 2]),  # tiny F, one column each for the first two
])
def test_ffn_shards_cover_f_exactly(f, fractions, gpus):
    def mutate(d):
        d["model"]["ffn_hidden_size"] = f
        d["parallel"]["stages"][1] = {"name": "experts", "gpus": gpus, "tensor_parallel_size": len(gpus),
                                      "shard_fractions": fractions}
    shards = _spec(mutate).ffn_shards()
    assert [r for r, _, _ in shards] == gpus
    assert shards[0][1] == 0 and shards[-1][2] == f
    assert all(a[2] == b[1] for a, b in zip(shards, shards[1:]))
    assert all(b > a for _, a, b in shards)


def test_derived_layout():
    spec = load_spec(None)
    assert spec.ranks == (0, 1, 2) and spec.world_size == 3
    assert spec.stage("experts").gpus == (1, 2)
    assert spec.micro_batch_sizes() == [256] * 4


@pytest.mark.parametrize("text,words", [
    (b'{"hardware": {"num_gpus": 3, "num_gpus": 4}}', "appears twice"),  # duplicate key
    (b'{"model": {"norm_eps": NaN}}', "NaN and Infinity"),
    (b'{"model": {"norm_eps": -Infinity}}', "NaN and Infinity"),
    (b'{"model": \xff}', "is not UTF-8"),
    (b"[" * 40 + b"]" * 40, "nested deeper"),
    (b"[" * 100000 + b"]" * 100000, "nested deeper"),  # deeper than Python's recursion limit
])
def test_strict_json(text, words):
    with pytest.raises(SpecError) as e:
        DeploymentSpec.from_json(text, "c.json")
    assert e.value.field == "c.json" and words in str(e.value)
    assert len(str(e.value)) < 300  # one short line, whatever the input


def test_echoed_value_is_cut_short():
    with pytest.raises(SpecError) as e:
        _spec(_set("model.dtype", "x" * 50_000_000))
    assert len(str(e.value)) < 300 and "characters" in str(e.value)


def _experts(**stage):
    def mutate(d):
        d["parallel"]["stages"][1] = {"name": "experts", **stage}
    return mutate


@pytest.mark.parametrize("stage,field,words", [
    ({"gpus": [1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1, 2], [3, 4, 5, 6]]},
     "expert_ids", "experts [7] are placed on no GPU"),  # a missing expert
    ({"gpus": [1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1, 2, 3], [3, 4, 5, 6, 7]]},
     "expert_ids", "expert 3 is placed twice (GPUs 1 and 2)"),  # a duplicate
    ({"gpus": [1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1, 1, 2, 3], [4, 5, 6, 7]]},
     "expert_ids", "expert 1 is placed twice on GPU 1"),  # a duplicate on one GPU
    ({"gpus": [1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1, 2, 3, 4, 5, 6, 7], []]},
     "expert_ids", "GPU 2 holds no experts"),  # an empty list names its GPU
    ({"gpus": [1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1, 2, 3], [4, 5, 6, 8]]},
     "expert_ids", "expert 8 does not exist"),  # an id >= E
    ({"gpus": [0, 1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1, 2, 3], [4, 5, 6, 7]]},
     "expert_ids", "one list per GPU"),  # list count != GPU count
    ({"gpus": [1, 2], "parallel_mode": "expert", "tensor_parallel_size": 2},
     "tensor_parallel_size", "must be 1"),
    ({"gpus": [1, 2], "parallel_mode": "expert", "shard_fractions": [0.5, 0.5]},
     "shard_fractions", "tensor mode only"),
    ({"gpus": [1, 2], "tensor_parallel_size": 2, "expert_ids": [[0], [1]]},
     "expert_ids", "parallel_mode"),  # expert_ids without expert mode
    ({"gpus": [1, 2], "parallel_mode": "data"}, "parallel_mode", "must be one of"),
    ({"gpus": [1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1, 2, 3], []]},
     "expert_ids", "GPU 2 holds no experts"),  # a GPU holding nothing is named
    ({"gpus": [1, 2], "parallel_mode": "expert", "expert_ids": [[0, 1, 2, 3], [4, 5, 6, "7"]]},
     "expert_ids", "lists of ints"),
])
def test_expert_parallel_rules_name_the_field(stage, field, words):
    with pytest.raises(SpecError) as e:
        _spec(_experts(**stage))
    assert e.value.field.startswith(f"parallel.stages[1].{field}") and words in str(e.value)


def test_expert_parallel_default_placement_and_mode_on_other_stages():
    spec = _spec(_experts(gpus=[0, 1, 2], parallel_mode="expert"))
    assert spec.expert_placement() == ((0, 1, 2), (3, 4, 5), (6, 7))  # near-even, contiguous
    assert spec.ffn_shards() == [(0, 0, 14336), (1, 0, 14336), (2, 0, 14336)]
    with pytest.raises(SpecError) as e:
        _spec(_set("parallel.stages[0].parallel_mode", "expert"))
    assert e.value.field == "parallel.stages[0].parallel_mode"
    with pytest.raises(SpecError) as e:  # more GPUs than experts
        _spec(lambda d: (d["model"].update(num_experts=2, top_k=1), _experts(
            gpus=[0, 1, 2], parallel_mode="expert")(d)))
    assert "more GPUs than experts" in str(e.value)
    assert DeploymentSpec.from_json(spec.to_json()) == spec  # round trip keeps the placement


def test_top_k_equal_to_num_experts_is_valid():
    spec = _spec(lambda d: d["model"].update(top_k=d["model"]["num_experts"]))
    assert spec.model.top_k == spec.model.num_experts
    with pytest.raises(SpecError, match="must be <= model.num_experts"):
        _spec(lambda d: d["model"].update(top_k=d["model"]["num_experts"] + 1))


def test_load_spec_by_packaged_name_reads_pyengine_configs():
    from pathlib import Path

    packaged = Path(__file__).resolve().parents[2] / "pyengine" / "configs" / "tiny_cpu.json"
    assert load_spec("tiny_cpu") == load_spec(packaged)


def test_load_spec_unknown_name_lists_the_packaged_names():
    with pytest.raises(SpecError) as e:
        load_spec("tiny_gpu")
    assert e.value.field == "config" and "tiny_cpu" in str(e.value) and "seed_3gpu" in str(e.value)


@pytest.mark.parametrize("path,value,words", [
    ("model.num_experts", 10**7, "must be <= 4096"),
    ("model.num_experts", 4097, "must be <= 4096"),  # one past the limit
])
def test_absurd_sizes_are_refused_by_the_spec_itself(path, value, words):
    """Refused by the rules, before any layout lists ten million experts (that refusal took 10 s)."""
    with pytest.raises(SpecError) as e:
        _spec(_set(path, value))
    assert e.value.field == path and words in str(e.value)


@pytest.mark.parametrize("layers,ok", [(1024, True), (1025, False), (100_000, False)])
def test_layer_count_limit(layers, ok):
    from helpers import packaged_config

    spec = load_spec(packaged_config("seed_model_3gpu.json"))
    if ok:
        assert spec.replace(model={"num_layers": layers}).model.num_layers == layers
        return
    with pytest.raises(SpecError) as e:
        spec.replace(model={"num_layers": layers})
    assert e.value.field == "model.num_layers" and "must be <= 1024" in str(e.value)


def test_many_missing_experts_are_counted_not_listed():
    ids = [[0, 1], [2, 3]]
    with pytest.raises(SpecError) as e:
        _spec(lambda d: (d["model"].update(num_experts=4000),
                         _experts(gpus=[1, 2], parallel_mode="expert", expert_ids=ids)(d)))
    assert "experts [4, 5, 6, 7, 8, 9, 10, 11, ... (3996 in all)] are placed on no GPU" in str(e.value)
    assert len(str(e.value)) < 300
