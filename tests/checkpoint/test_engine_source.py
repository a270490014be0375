"""`Engine(spec, transport, source=checkpoint)` refuses a spec that disagrees with the checkpoint in
anything the logits depend on, or in which part it holds (whole model / one layer's block), before
any rank works: before this check a wrong top_k, layer count, head split or RoPE base ran and
returned logits off by 4-14 (found by a hostile pass). The API's own arguments are named as the
API names them (`folder`, `layer`, `hf`, `batch`), not as CLI flags."""

from __future__ import annotations

import json
import shutil

import pytest

from pyengine.core.errors import InputError, SpecError
from pyengine.execute.engine import Engine
from pyengine.model.checkpoint import open_checkpoint
from pyengine.model.hf_config import deployment_spec
from pyengine.transport.local import LocalTransport


@pytest.fixture(scope="module")
def whole(checkpoint):
    folder, _ = checkpoint("qwen3_moe", norm_topk_prob=True)
    source = open_checkpoint(folder)
    return folder, source, deployment_spec(source.hf, whole=True, batch=(2, 5))


@pytest.mark.parametrize("field,value", [
    ("top_k", 1), ("num_layers", 1), ("num_key_value_heads", 11), ("qk_norm", "full"), ("rope_theta", 123456.0),
    ("renormalize", False), ("norm_eps", 1e-3), ("attention_bias", True),
])
def test_a_spec_off_the_checkpoint_is_refused_naming_the_field(whole, field, value):
    _, source, spec = whole
    bad = spec.replace(model={field: value})
    with pytest.raises(SpecError) as e:
        Engine(bad, LocalTransport.create(3, "cpu", 5)[0], source=source)
    assert e.value.field == f"model.{field}" and "disagrees with the checkpoint" in str(e.value), e.value


def test_the_spec_built_from_it_is_accepted_and_dtype_may_differ(whole):
    _, source, spec = whole
    Engine(spec, LocalTransport.create(3, "cpu", 5)[1], source=source)
    Engine(spec.replace(model={"dtype": "float16"}), LocalTransport.create(3, "cpu", 5)[1], source=source)


def test_whole_and_block_must_match_the_source(whole):
    folder, source, spec = whole
    tr = LocalTransport.create(3, "cpu", 5)[0]
    with pytest.raises(SpecError, match=r"model.num_layers = 3: the source holds layer 0's MoE block only"):
        Engine(spec, tr, source=open_checkpoint(folder, layer=0))
    block = deployment_spec(source.hf, batch=(2, 5))
    with pytest.raises(SpecError, match=r"model.num_layers = None: the source is the whole model"):
        Engine(block, tr, source=source)


def test_open_checkpoint_names_its_arguments(whole, tmp_path):
    folder, _, _ = whole
    for args, match in [((None,), r"^folder = 'NoneType': must be a path"),
                        ((folder, "0"), r"^layer = '0': must be an integer"),
                        ((tmp_path / "missing",), r"^folder = .*is not a directory"),
                        ((folder, 99), r"^layer = 99: out of range")]:
        with pytest.raises(InputError, match=match):
            open_checkpoint(*args)


def test_deployment_spec_names_its_arguments(whole):
    _, source, spec = whole
    for kwargs, match in [(dict(hf=source), r"^hf = 'CheckpointWeights': .*open_checkpoint\(folder\).hf"),
                          (dict(hf="/ckpt"), r"^hf = 'str'"),
                          (dict(hf=source.hf, batch=5), r"^batch = 5: must be \(sequences, longest\)"),
                          (dict(hf=source.hf, batch=(2,)), r"^batch = \(2,\)"),
                          (dict(hf=source.hf, config=3), r"^config = 'int'")]:
        with pytest.raises(InputError, match=match):
            deployment_spec(**kwargs)
    d = spec.to_dict()
    layout = {"hardware": d["hardware"], "parallel": d["parallel"], "schedule": {"micro_batches": 2}}
    assert deployment_spec(source.hf, layout, whole=True, batch=(2, 5)).schedule.micro_batches == 2


@pytest.mark.parametrize("key,value,match", [
    ("eos_token_id", "x", r"eos_token_id = 'x': must be a token id"),
    ("eos_token_id", [2, -1], r"eos_token_id = \[2, -1\]"),
    ("rope_parameters", {"rope_type": "default", "rope_theta": "abc"}, r"rope_parameters.rope_theta = 'abc'"),
])
def test_bad_attention_values_in_config_json_are_named(whole, tmp_path, key, value, match):
    folder, _, _ = whole
    bad = tmp_path / "ckpt"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg.pop("rope_theta", None)
    cfg[key] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InputError, match=match):
        open_checkpoint(bad)
