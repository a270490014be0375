"""A gpt-oss checkpoint with its experts in MXFP4, as the released ones store them (`*_blocks` +
`*_scales`, a `quantization_config` of quant_method mxfp4): packed by hand from random bytes, its
dequantization (transformers' own) written into a tiny transformers model that is the reference.
The engine reads it equal, bit for bit, to the float checkpoint of those dequantized weights (every
shard: TP columns of the interleaved gate/up and of down, EP experts), runs it equal to
transformers' logits, and refuses any other quantization in one line naming it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import tiny_hf
from helpers import on_threads
from pyengine.core.errors import InputError
from pyengine.execute.engine import Engine
from pyengine.model.checkpoint import open_checkpoint
from pyengine.model.hf_config import deployment_spec
from pyengine.model.stages import Shard
from pyengine.transport.local import LocalTransport

H = F = 32  # MXFP4 packs 32 values per scale along `in`
LAYOUT = [{"name": "embed", "gpus": [0]},
          {"name": "experts", "gpus": [1, 2], "tensor_parallel_size": 2, "shard_fractions": [0.3, 0.7]},
          {"name": "output", "gpus": [0]}]


def _packed(shape, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (*shape, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(121, 126, shape, generator=g, dtype=torch.uint8)  # 2^-6 .. 2^-2
    return blocks, scales


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(float folder, mxfp4 folder, the transformers model both hold)."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    model = tiny_hf.build("gpt_oss", root / "float", hidden=H, ffn=F)
    e, packed = model.config.num_local_experts, {}
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            p = f"model.layers.{i}.mlp.experts."
            for name, shape in (("gate_up_proj", (e, 2 * F, H // 32)), ("down_proj", (e, H, F // 32))):
                blocks, scales = _packed(shape, 10 * i + len(name))
                packed[p + name + "_blocks"], packed[p + name + "_scales"] = blocks, scales
                getattr(layer.mlp.experts, name).copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
    model.save_pretrained(str(root / "float"))
    tensors = {k: v for k, v in load_file(str(root / "float" / "model.safetensors")).items()
               if not k.endswith(("gate_up_proj", "down_proj"))}
    (root / "mxfp4").mkdir()
    save_file({**tensors, **packed}, str(root / "mxfp4" / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((root / "float" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (root / "mxfp4" / "config.json").write_text(json.dumps(cfg))
    return root / "float", root / "mxfp4", model


def test_mxfp4_experts_read_equal_to_their_dequantized_float_weights(folders, layout_config):
    plain, packed = open_checkpoint(folders[0]), open_checkpoint(folders[1])
    assert packed.hf.experts_mxfp4 and not plain.hf.experts_mxfp4
    spec = deployment_spec(packed.hf, layout_config(LAYOUT, 2, model={"batch_size": 2, "seq_len": 11}), whole=True)
    shards = [Shard(), Shard(f_cols=(0, 10)), Shard(f_cols=(10, 32)), Shard(f_cols=(5, 9)), Shard(experts=(1, 3))]
    for name in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
        for shard in shards:
            want = plain.weight(spec, name, shard, layer=2)
            got = packed.weight(spec, name, shard, layer=2)
            assert got.dtype == want.dtype and torch.equal(got, want), (name, shard)
    full = Shard()
    assert packed.read_bytes(spec, "w_gate", full, 0) < plain.read_bytes(spec, "w_gate", full, 0) / 6


def test_mxfp4_checkpoint_runs_equal_to_transformers(folders, layout_config):
    source = open_checkpoint(folders[1])
    spec = deployment_spec(source.hf, layout_config(LAYOUT, 3, model={"batch_size": 2, "seq_len": 11}), whole=True)
    ids = torch.randint(0, 37, (2, 11), generator=torch.Generator().manual_seed(3))
    transports = LocalTransport.create(3, "cpu", 30)
    got = on_threads(lambda r: Engine(spec, transports[r], source=source).forward(ids), timeout_s=120)[0]
    with torch.no_grad():
        ref = folders[2](ids).logits
    assert float((got - ref).abs().max() / ref.abs().max()) <= 1e-5


@pytest.mark.parametrize("qc,key", [({"quant_method": "fp8"}, "quantization_config.quant_method"),
                                    ({"quant_method": "mxfp4", "weight_block_size": [128, 128]},
                                     "quantization_config.weight_block_size")])
def test_other_quantization_is_refused_in_one_line(folders, tmp_path, qc, key):
    folder = tmp_path / "q"
    shutil.copytree(folders[1], folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(cfg, quantization_config=qc)))
    with pytest.raises(InputError) as e:
        open_checkpoint(folder)
    assert key in str(e.value) and "\n" not in str(e.value)
