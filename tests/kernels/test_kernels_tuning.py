"""Config selection (env pin > tuned JSON > default) and the `pyengine tune` subcommand."""

import argparse
import json

import pytest
import torch

from pyengine.cli import tune as tune_cli
from pyengine.core.spec import load_spec
from pyengine.model.stages import StageKind, stages_of
from pyengine.kernels import tuning


def test_parse_config_roundtrip():
    text = "BLOCK_M=64,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=4,num_stages=3"
    cfg = tuning.parse_config(text)
    assert cfg.kwargs == {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}
    assert (cfg.num_warps, cfg.num_stages) == (4, 3)
    assert tuning.config_from_dict(tuning.config_to_dict(cfg)).kwargs == cfg.kwargs


@pytest.mark.parametrize("text,match", [
    ("BLOCK_M=64", r"keys .* must be exactly"),  # missing keys
    ("BLOCK_M=48,BLOCK_N=128,BLOCK_K=64,GROUP_M=8,num_warps=4,num_stages=3", r"BLOCK_M=48: must be a power of two"),
    ("BLOCK_M=x,BLOCK_N=128", r"'BLOCK_M=x': expected KEY=<positive int>"),
])
def test_parse_config_errors(text, match):
    with pytest.raises(ValueError, match=match):
        tuning.parse_config(text)


@pytest.mark.parametrize("T,bucket", [(0, 16), (1, 16), (17, 32), (256, 256), (257, 512), (10 ** 6, 16384)])
def test_m_bucket(T, bucket):
    assert tuning.m_bucket(T) == bucket


def test_env_pin_beats_everything(monkeypatch):
    monkeypatch.setenv("PYENGINE_MOE_CONFIG", "BLOCK_M=32,BLOCK_N=16,BLOCK_K=16,GROUP_M=1,num_warps=1,num_stages=1")
    monkeypatch.setenv("PYENGINE_MOE_ROW_CONFIG", "BLOCK_M=16,BLOCK_N=16,BLOCK_K=16,GROUP_M=1,num_warps=1,num_stages=1")
    shape = dict(device=torch.device("cpu"), dtype=torch.float32, E=3, H=24, F=17, num_tokens=7)
    assert tuning.select_config("column", **shape).kwargs["BLOCK_M"] == 32
    assert tuning.select_config("row", **shape).kwargs["BLOCK_M"] == 16


def test_cpu_uses_the_small_config(monkeypatch):
    for var in ("PYENGINE_MOE_CONFIG", "PYENGINE_MOE_COLUMN_CONFIG", "PYENGINE_MOE_ROW_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    cfg = tuning.select_config("column", device=torch.device("cpu"), dtype=torch.float16, E=3,
                               H=24, F=17, num_tokens=7)
    assert cfg is tuning.CPU_CONFIGS[0]
    assert tuning.moe_configs("row", torch.device("cpu")) == tuning.CPU_CONFIGS
    assert len(tuning.moe_configs("column", torch.device("cuda"))) > 1


def test_tuned_file_nearest_bucket(tmp_path):
    path = tuning.config_path("column", "NVIDIA H100 80GB HBM3", torch.bfloat16, 8, 4096, 7168, tmp_path)
    assert path.name == "column__NVIDIA_H100_80GB_HBM3__bf16__E8_H4096_F7168.json"
    small = tuning.config_to_dict(tuning.GPU_DEFAULT_UNALIGNED["column"])
    big = tuning.config_to_dict(tuning.GPU_DEFAULT["column"])
    path.write_text(json.dumps({"meta": {}, "configs": {"256": small, "1024": big}}))
    assert tuning.config_to_dict(tuning.load_tuned(path, 200)) == small  # bucket 256, exact
    assert tuning.config_to_dict(tuning.load_tuned(path, 4000)) == big  # bucket 4096 -> nearest 1024
    assert tuning.config_to_dict(tuning.load_tuned(path, 1)) == small  # bucket 16 -> nearest 256
    assert tuning.load_tuned(tmp_path / "missing.json", 256) is None


def test_bad_op():
    with pytest.raises(ValueError, match=r"op='gate': must be one of"):
        tuning.moe_configs("gate", torch.device("cpu"))


def _with_experts(ffn, gpus, fractions=None):
    spec = load_spec(None)
    st = [{"name": "embed", "gpus": [0]},
          {"name": "experts", "gpus": gpus, "tensor_parallel_size": len(gpus), "shard_fractions": fractions},
          {"name": "output", "gpus": [0]}]
    return spec.replace(model={"ffn_hidden_size": ffn}, parallel={"stages": st})


@pytest.mark.parametrize("ffn,gpus,fractions,want", [
    (14336, [1, 2], None, [7168, 7168]),
    (40, [0, 1, 2], None, [13, 14, 13]),  # cumulative rounding of F/3: what the runtime launches
    (10, [0, 1, 2], [0.25, 0.25, 0.5], [2, 3, 5]),
    (14336, [1, 2], [0.25, 0.75], [3584, 10752]),
])
def test_tune_shards_are_the_shards_the_runtime_launches(ffn, gpus, fractions, want):
    spec = _with_experts(ffn, gpus, fractions)
    experts = stages_of(spec)[StageKind.EXPERTS]
    assert tune_cli.shard_sizes(spec) == want == [experts.f_cols(r) for r in experts.ranks]


def _parse(argv):
    parser = argparse.ArgumentParser(prog="pyengine")
    tune_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_tune_subcommand_parses():
    args = _parse(["tune", "--dtype", "bf16", "--tokens", "256", "1024", "--out", "x"])
    assert (args.dtype, args.tokens, args.out, args.config) == ("bf16", [256, 1024], "x", None)
    assert args.func is tune_cli.run


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
def test_tune_without_cuda_exits_2(capsys):
    assert tune_cli.run(_parse(["tune"])) == 2
    assert "no CUDA device" in capsys.readouterr().err
